"""Run ``torchrun`` or ``accelerate launch`` in this process, deaf to SIGTERM and SIGUSR1.

    python scripts/cluster/shielded_launch.py torchrun --nnodes 1 --nproc_per_node 8 ... train.py ...
    python scripts/cluster/shielded_launch.py accelerate --num_processes 8 ... -m aptp.prune ...

Why: a launcher must outlive the preemption signal while its workers write their checkpoints. Measured with
torch 2.14: SIGUSR1 kills torchrun at once (no handler) and leaves the workers orphaned; SIGTERM makes it
forward SIGTERM to the workers, SIGKILL them 30 s later and exit 1 even when they exited 0. scripts/cluster/
node.sh sends SIGUSR1 to the workers themselves; here the launcher only has to keep running and report
their exit codes. The handlers are Python functions, not SIG_IGN: exec resets caught signals to their
default, so the workers start with normal dispositions and install their own preemption handlers.
"""

import os
import runpy
import signal
import sys


def _ignore(signum, frame):
    pass


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("torchrun", "accelerate"):
        sys.exit("usage: shielded_launch.py torchrun|accelerate [launcher arguments]")
    tool, rest = sys.argv[1], sys.argv[2:]
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _ignore)
    # torch's elastic agent (used by both launchers) installs its own SIGTERM handler unless told otherwise
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    if tool == "torchrun":
        sys.argv = ["torchrun", *rest]
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["accelerate launch", *rest]
        runpy.run_module("accelerate.commands.launch", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
