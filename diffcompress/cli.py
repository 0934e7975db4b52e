"""Entry-point wrapper and flag types: user errors end the script with one line on stderr, not a traceback.

Every script builds its parser with ``ArgumentParser`` (argparse's, with the repository's one-line ``error: ...``
ending) and types its numeric flags with ``positive_int`` and friends, so a meaningless value (``--depth 0``,
``--ckpt-every -1``) is refused at parse time with the flag named, in one place. ``run`` turns user errors and the
environment's write failures (full disk, read-only or unwritable folder) into one line; anything else, a
programming error, keeps its traceback."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from .errors import UserError

USER_ERRORS = (UserError, ValueError, FileNotFoundError)

# OSErrors that are the environment, not a bug: said in one line naming the path
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device (free some space, then run again: earlier checkpoints are intact)",
    errno.EDQUOT: "disk quota exceeded (free some space, then run again: earlier checkpoints are intact)",
    errno.EROFS: "the folder is on a read-only file system: choose a writable output folder",
    errno.EACCES: "permission denied: choose a folder this user can write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder this user can write, or fix its permissions",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "this path is a folder, expected a file",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the repository's error ending: the usage, then one line ``error: argument --x: ...``."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _number(kind: type, test: Callable[[float], bool], expected: str) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
unit_float = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
finite_float = _number(float, lambda v: True, "a finite number")
sampling_steps = _number(int, lambda v: v >= 2, "an integer >= 2 (the posterior variance needs two steps)")


def environment_error(e: OSError) -> str | None:
    """The one line for an OSError the environment caused (full disk, read-only folder ...), else None."""
    why = ENVIRONMENT_ERRNOS.get(e.errno)
    if why is None:
        return None
    where = e.filename if e.filename is not None else "an output file"
    return f"{str(where)!r}: {why}"


def run(main: Callable[[], object]) -> None:
    """Call ``main()``; on a user error print ``error: <message>`` and exit 2 (DIFFCOMPRESS_DEBUG=1 re-raises)."""
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("DIFFCOMPRESS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        line = environment_error(e)
        if line is None or os.environ.get("DIFFCOMPRESS_DEBUG"):
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
