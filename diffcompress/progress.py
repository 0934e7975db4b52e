"""Progress of long loops: a tqdm bar on a terminal; in a log file, under CI or a batch scheduler, one plain line
every ``DIFFCOMPRESS_PROGRESS_EVERY`` seconds (default 30) and one at the end, instead of a bar redrawn per step.

``DIFFCOMPRESS_PROGRESS=bar|lines|off`` overrides the choice (the demos set ``lines`` for their stage logs).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

Progress = Any  # a tqdm bar or a LineProgress: iterate, update, set_postfix, close


def mode() -> str:
    """``bar``, ``lines`` or ``off``: the environment's choice, else a bar only when stderr is a terminal."""
    chosen = os.environ.get("DIFFCOMPRESS_PROGRESS", "").strip().lower()
    if chosen in ("bar", "lines", "off"):
        return chosen
    if chosen:
        raise ValueError(f"DIFFCOMPRESS_PROGRESS={chosen!r}: expected bar, lines or off")
    interactive = getattr(sys.stderr, "isatty", lambda: False)() and not os.environ.get("CI")
    return "bar" if interactive else "lines"


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
) -> Progress:
    """tqdm's interface (iterate, ``update``, ``set_postfix``, ``close``, ``with``) for a loop's progress.

    ``leave=False`` marks an inner loop: on a terminal its bar vanishes when done; in a log it writes only the
    periodic lines, no closing one."""
    chosen = "off" if disable else mode()
    if chosen == "bar":
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                        silent=chosen == "off")  # fmt: skip


class LineProgress:
    """Counts like tqdm and writes ``desc: n/total (pct) rate, elapsed, left: postfix`` lines to stderr."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, leave: bool = True, silent: bool = False,
                 every: float | None = None, file: TextIO | None = None):  # fmt: skip
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit, self.leave, self.silent = (
            iterable, total, desc, unit, leave, silent)  # fmt: skip
        self.n = self.initial = initial
        self.every = float(os.environ.get("DIFFCOMPRESS_PROGRESS_EVERY", 30)) if every is None else every
        self.file = file
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.write_line()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.leave and self.n > self.initial:
                self.write_line()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: " if self.desc else ""
        text += f"{self.n}/{self.total}" if self.total else f"{self.n}"
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        speed = f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}"
        text += f" {speed}, {format_seconds(elapsed)}"
        if self.total and rate > 0 and self.n < self.total:
            text += f", {format_seconds((self.total - self.n) / rate)} left"
        return text + (f": {self.postfix}" if self.postfix else "")

    def write_line(self) -> None:
        if not self.silent:
            print(self.line(), file=self.file or sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{s:02d}" if hours else f"{minutes:02d}:{s:02d}"
