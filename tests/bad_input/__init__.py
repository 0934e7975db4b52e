"""The rows of tests/test_bad_input.py, one module per area (each owns its small worlds): ``Case`` and its runner.

A row names the class of issue 21 it covers, builds what it needs under a temporary folder, runs one command in this
process (a top-level script, or ``aptp.<stage>``), and states the exit code, the words of the one-line error, and
what must hold afterwards (nothing written, the previous state intact, the right output)."""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import ScriptResult as Result

ROOT = Path(__file__).resolve().parents[2]

# the classes of issue 21
SILENT = "no silent wrong result"
TRACEBACK = "no traceback"
NAMED = "the line names the file or flag"
MALICIOUS = "malicious checkpoint"
LEFTOVERS = "nothing left behind"
CLASSES = (SILENT, TRACEBACK, NAMED, MALICIOUS, LEFTOVERS)


@dataclass
class Case:
    """``prepare(tmp)`` builds the inputs and returns the command: ``["train.py", flags...]`` or
    ``["aptp.prune", flags...]``. ``words``: all must appear in the last stderr line (a one-line error when ``code``
    is not 0). ``check(tmp, result)``: what must hold afterwards."""

    id: str
    klass: str
    prepare: Callable[[Path], Sequence[object]]
    code: int = 2
    words: tuple[str, ...] = ()
    check: Callable[[Path, Result], None] | None = None
    marks: tuple = field(default_factory=tuple)


def run_command(argv: Sequence[object], capsys, monkeypatch) -> Result:
    """Run a top-level script's ``__main__`` or a module's (``aptp.x``) in this process, as the shell would."""
    target, *args = [str(a) for a in argv]
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [target, *args])
    try:
        if target.endswith(".py"):
            runpy.run_path(str(ROOT / target), run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)
