"""The stage runner of the CPU demos (demo.py, demo_aptp.py): each stage is one of the project's commands with its
own flags, so a demo is the list of commands a user would type, recorded in ``<out>/commands.sh``."""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import UserError

ROOT = Path(__file__).resolve().parent.parent
LOG_TAIL = 8  # lines of a failed stage's log shown on the console


@contextlib.contextmanager
def lines_progress():
    """Progress as log lines (diffcompress.progress) while a stage writes into its log file."""
    before = os.environ.get("DIFFCOMPRESS_PROGRESS")
    os.environ["DIFFCOMPRESS_PROGRESS"] = "lines"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DIFFCOMPRESS_PROGRESS")
        else:
            os.environ["DIFFCOMPRESS_PROGRESS"] = before


class StageRunner:
    """Runs commands and logs them: ``module`` is a top-level script (``"train"``: ``python train.py``) or a package
    module (``"aptp.prune"``: ``python -m aptp.prune``).

    ``in_process=True`` imports the module and calls ``main(parse_args(argv))``, returning its result (no interpreter
    start-up per stage); otherwise a child process runs it. Each stage's output (stdout, stderr, its progress as a
    line every so often) goes to ``<out>/logs/<NN>-<name>.log``, so the console shows only the list of stages, and
    a failed stage's last lines; ``seconds`` holds the wall time of every stage by its description.
    """

    def __init__(self, out: Path, in_process: bool = False):
        self.out, self.logs, self.in_process = out, out / "logs", in_process
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands: list[str] = []
        self.seconds: dict[str, float] = {}

    def __call__(self, module: str, argv: list, what: str) -> Any:
        argv = [str(a) for a in argv]
        launch = ["python", "-m", module] if "." in module else ["python", f"{module}.py"]
        command = shlex.join([*launch, *(a.replace(f"{ROOT}{os.sep}", "") for a in argv)])
        self.commands.append(command)
        log = self.logs / f"{len(self.commands):02d}-{module.split('.')[-1]}.log"
        print(f"[{len(self.commands):02d}] {what}\n     $ {command}", flush=True)
        start = time.perf_counter()
        if self.in_process:
            result = self._in_process(module, argv, log, command)
        else:
            result = self._child(module, argv, log, what)
        preempted = result.get("preempted") if isinstance(result, dict) else getattr(result, "preempted", False)
        if preempted:  # a training stage turns SIGTERM/SIGUSR1 into a checkpoint and a clean return: stop here too
            raise UserError(f"stopped by a signal during: {what} (it checkpointed; output in {log})")
        self.seconds[what] = time.perf_counter() - start
        print(f"     done in {self.seconds[what]:.1f}s (output in {log})", flush=True)
        return result

    def _in_process(self, module: str, argv: list[str], log: Path, command: str) -> Any:
        script = importlib.import_module(module)
        try:
            with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f), lines_progress():
                print(f"$ {command}", flush=True)
                return script.main(script.parse_args(argv))
        except BaseException as e:
            print(f"     failed: {type(e).__name__}: {e} (output in {log})", flush=True)
            raise

    def _child(self, module: str, argv: list[str], log: Path, what: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        env["DIFFCOMPRESS_PROGRESS"] = "lines"
        with open(log, "w") as f:
            f.write(f"$ {self.commands[-1]}\n")
            f.flush()
            code = subprocess.run([sys.executable, "-m", module, *argv], stdout=f, stderr=f, env=env).returncode
        if code != 0:
            tail = "".join("     | " + line for line in log.read_text().splitlines(keepends=True)[-LOG_TAIL:])
            print(tail, end="", file=sys.stderr, flush=True)
            raise UserError(f"step {len(self.commands)} ({what}) failed with exit code {code}: see above and {log}")

    def write_commands(self) -> Path:
        path = self.out / "commands.sh"
        path.write_text("#!/bin/sh\n# the steps of this run, as command lines (run from the repository root)\nset -e\n"
                        + "\n".join(self.commands) + "\n")  # fmt: skip
        return path
