"""The Slurm batch scripts on a real one-node Slurm (started by .ci/slurm.sh): learnable pruning, fine-tuning, and a
preempted fine-tune that checkpoints, requeues itself and ends with the same weights as an uninterrupted one.

Skipped, with the reason, where Slurm is not installed or its controller does not answer (.ci/slurm.sh starts it;
this module also tries it once when the binaries are there and we are root).

Measured on Slurm 22.05 here (Debian bookworm, no systemd/cgroups; see .ci/slurm.sh for the configuration):
- `scancel --signal=USR1 --batch JOB` (what `#SBATCH --signal=B:USR1@N` sends N s before the limit) reaches only the
  batch shell; its trap runs at once, also while the shell sits in `wait` (which then returns 138).
- `scontrol requeue $SLURM_JOB_ID` from inside the job keeps the job id, sets Restarts=1 and SLURM_RESTART_COUNT=1 in
  the new run, and ends what is left of the old run (its log: "CANCELLED AT ... DUE TO JOB REQUEUE").
- The requeued job is held for the credential lifetime (Reason=BeginTime, default 120 s; AuthInfo=cred_expire=10
  here) and then waits for the next scheduler pass (sched_interval, default 60 s; 2 s here).
- A requeued job's --output file is truncated unless --open-mode=append (the scripts set it).
- Finished jobs stay in `scontrol show job` for MinJobAge (300 s here); the polling below reads nothing else.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from diffcompress.checkpoint import load_file, read_metadata
from models_with_layer_pruning import create_model

from .conftest import ROOT
from .test_train import assert_same_state, make_features

pytestmark = pytest.mark.slow

START_SCRIPT = ROOT / ".ci" / "slurm.sh"
# The tiny CPU setting: DiT-Ti/4 on 8x8 latents (4 tokens), 4 classes, one gloo process with one thread.
COMMON_ENV = {"DEVICE": "cpu", "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
              "MODEL": "DiT-Ti/4", "IMAGE_SIZE": "", "GLOBAL_BATCH_SIZE": "8"}  # fmt: skip
# The scripts ask for 8 GPUs and 32 CPUs; the test node has no GPU (gres) and 2 CPUs.
SBATCH_RESOURCES = ["--gpus-per-node=0", "--cpus-per-task=1"]
FINETUNE_STEPS = 40  # ~0.1 s of CPU each: long enough to signal mid-run, short enough for a busy 2-core machine
FINETUNE_ARGS = "--depth 6 --num-classes 4 --num-workers 0 --lr 1e-3 --lr-min 1e-4"  # the pruned model: 6 blocks
PRUNE_ARGS = "--groups 1:2 --num-classes 4 --num-workers 0 --log-every 2"  # DiT-Ti/4 has 12 blocks: 1:2 keeps 6
POLL = 0.5  # seconds between `scontrol show job` rounds (each is a process; the 2 cores are busy enough)
TIMINGS: list[str] = []


def _sinfo_state() -> str:
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo failed: {e}"
    return result.stdout.strip() if result.returncode == 0 else f"sinfo failed: {result.stderr.strip()[-300:]}"


def _node_up(state: str) -> bool:
    return state.split("\n")[0].rstrip("*~#") in ("idle", "mix", "alloc", "comp")


@pytest.fixture(scope="module")
def slurm():
    if not shutil.which("sbatch") or not shutil.which("scontrol"):
        pytest.skip("Slurm is not installed (no sbatch/scontrol); .ci/slurm.sh (as root) installs and starts one")
    state = _sinfo_state()
    if not _node_up(state) and shutil.which("slurmctld") and os.geteuid() == 0 and START_SCRIPT.exists():
        started = subprocess.run(["bash", str(START_SCRIPT), "start"], capture_output=True, text=True, timeout=180)
        state = _sinfo_state()
        if not _node_up(state):
            pytest.skip(f"no local Slurm: {(started.stderr or started.stdout).strip()[-500:] or state}")
    if not _node_up(state):
        pytest.skip(f"the Slurm controller does not answer or its node is not up ({state}); run .ci/slurm.sh")
    cluster = {"jobs": [], "env": {}}
    node = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=15).stdout.split()
    try:
        socket.gethostbyname(node[0])
    except (OSError, IndexError):  # the scripts rendezvous at the first node's name; a container's may not resolve
        cluster["env"]["MASTER_ADDR"] = "127.0.0.1"
    yield cluster
    for job in cluster["jobs"]:  # a failed test must not leave jobs running into the rest of the suite
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features"), n=48)


def submit(cluster: dict, script: str, out_dir: Path, env: dict) -> tuple[str, float]:
    """sbatch a script from scripts/slurm with ``env`` on top of ours (--export=ALL); returns (job id, submit time)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", "--export=ALL", *SBATCH_RESOURCES, f"--output={out_dir}/slurm-%j.out",
           str(ROOT / "scripts" / "slurm" / script)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                            env={**os.environ, **COMMON_ENV, **cluster["env"], **env})  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    cluster["jobs"].append(job)
    return job, time.time()


def job_info(job: str) -> dict:
    result = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"scontrol show job {job}: {result.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", result.stdout))


class Watch:
    """Polls one job and notes when each state was first seen (seconds after submission)."""

    def __init__(self, job: str, submitted_at: float):
        self.job, self.t0, self.seen, self.info = job, submitted_at, {}, {}

    def poll(self) -> dict:
        self.info = job_info(self.job)
        key = f"{self.info['JobState']}#{self.info.get('Restarts', '0')}"
        self.seen.setdefault(key, round(time.time() - self.t0, 1))
        return self.info

    def done(self) -> bool:  # an ended job is not polled again: Slurm forgets it MinJobAge after its end
        final = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OOM", "BOOT_FAIL", "DEADLINE")
        return self.info.get("JobState") in final or self.poll()["JobState"] in final

    def report(self, name: str) -> str:
        events = ", ".join(f"{k.replace('#0', '').replace('#', ' restart ')} {v} s" for k, v in self.seen.items())
        return f"{name} (job {self.job}): submitted 0 s, {events}"


def job_log(out_dir: Path, job: str) -> Path:
    return out_dir / f"slurm-{job}.out"


def wait_all(watches: dict, timeout: float):
    """Poll every job (so that each one's timeline is seen) until all have ended; ``watches``: out dir -> Watch."""
    deadline = time.time() + timeout
    while not all([w.done() for w in watches.values()]):  # a list: poll them all, every round
        if time.time() > deadline:
            late = {d: w for d, w in watches.items() if not w.done()}
            tails = [f"job {w.job} still {w.info['JobState']} after {timeout} s:\n{tail(job_log(d, w.job))}"
                     for d, w in late.items()]  # fmt: skip
            pytest.fail("\n".join(tails))
        time.sleep(POLL)


def tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else f"({path} does not exist)"


def check_log_dir(log_root: Path, name: str, job: str, runs: int) -> str:
    """The per-job folder of scripts/cluster/common.sh: the settings, one 'run start' per run, the node's output."""
    folder = log_root / f"{name}-{job}"
    assert {"settings.env", "launch.log", "node0.log"} <= {p.name for p in folder.iterdir()}, list(folder.iterdir())
    launch = (folder / "launch.log").read_text()
    assert launch.count(" run start ") == runs, launch
    assert "run end: status 0" in launch.splitlines()[-1], launch
    assert "DEVICE=cpu" in (folder / "settings.env").read_text()
    return launch


@pytest.fixture(scope="module")
def runs(slurm, features, tmp_path_factory):
    """Three jobs at once (the test partition lets two share a core): learnable pruning of DiT-Ti/4 with 1:2 groups
    (12 -> 6 layers, LoRA, 4 steps), and two identical fine-tunes of a 6-block DiT-Ti/4, of which the first gets the
    pre-termination signal after its third step. Returns name -> (out dir, job id, final `scontrol show job`)."""
    root = tmp_path_factory.mktemp("slurm")
    torch.manual_seed(0)  # the fine-tunes' initial weights, as the pruning job would have written them
    torch.save(create_model("DiT-Ti/4", input_size=8, num_classes=4, depth=6).state_dict(), root / "init.pt")
    finetune = {"LOAD_WEIGHT": str(root / "init.pt"), "DATA_PATH": str(features), "LOG_EVERY": "1",
                "MAX_STEPS": str(FINETUNE_STEPS), "CKPT_EVERY": "100000", "EXTRA_ARGS": FINETUNE_ARGS}  # fmt: skip
    prune = {"LOAD_WEIGHT": "", "DATA_PATH": str(features), "MAX_STEPS": "4", "SAVE_MODEL": str(root / "D6.pt"),
             "CKPT_EVERY": "100000", "EXTRA_ARGS": PRUNE_ARGS}  # fmt: skip
    plan = {"preempted": ("finetune.sbatch", finetune), "straight": ("finetune.sbatch", finetune),
            "prune": ("prune_by_learning.sbatch", prune)}  # fmt: skip
    watches = {}
    for name, (script, env) in plan.items():
        out = root / name
        env = {**env, "RESULTS_DIR": str(out / "results"), "LOG_ROOT": str(out / "logs")}
        watches[out] = Watch(*submit(slurm, script, out, env))
    a, watch_a = root / "preempted", watches[root / "preempted"]
    metrics = a / "results" / "finetune-DiT-Ti-4" / "metrics.jsonl"  # one line per step
    deadline = time.time() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
        ended = [out for out, w in watches.items() if w.done()]  # polls every job
        assert a not in ended, f"ended before the signal:\n{tail(job_log(a, watch_a.job))}"
        failed = [out for out in ended if watches[out].info["JobState"] != "COMPLETED"]
        assert not failed, "\n".join(f"{watches[out].info}\n{tail(job_log(out, watches[out].job))}" for out in failed)
        assert time.time() < deadline, f"no 3 steps logged in 300 s:\n{tail(job_log(a, watch_a.job))}"
        time.sleep(POLL)
    subprocess.run(["scancel", "--signal=USR1", "--batch", watch_a.job], check=True, timeout=30)
    watch_a.seen.setdefault(f"USR1 sent#{watch_a.info.get('Restarts', '0')}", round(time.time() - watch_a.t0, 1))
    wait_all(watches, 360)
    for out, w in watches.items():
        TIMINGS.append(w.report(f"{plan[out.name][0]} ({out.name})"))
    return {out.name: (out, w.job, w.info) for out, w in watches.items()}


def test_prune_by_learning_job(runs):
    root, job, info = runs["prune"]
    out = job_log(root, job).read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-3000:]
    assert "kept 6/12 layers" in out  # node 0's output reaches the job's stdout
    saved = root.parent / "D6.pt"
    meta = read_metadata(saved)
    assert len(meta["kept_indices"]) == 6 and meta["groups"] == [[1, 2]] * 6
    assert all(k // 2 == g for g, k in enumerate(meta["kept_indices"]))  # one block from each pair
    model = create_model("DiT-Ti/4", input_size=8, num_classes=4, depth=6)  # what finetune.sbatch starts from
    model.load_state_dict(torch.load(saved, weights_only=True))
    exp = root / "results" / "prune-DiT-Ti-4"
    assert json.loads((exp / "decisions.json").read_text())["history"][-1]["kept"] == meta["kept_indices"]
    assert [p.name for p in (exp / "checkpoints").glob("*.pt")] == ["0000004.pt"]
    check_log_dir(root / "logs", "prune-by-learning", job, runs=1)


def test_finetune_preempted_requeued_equals_uninterrupted(runs, capsys):
    with capsys.disabled():
        print(f"\nSlurm job timings (seconds after sbatch; first time each state was seen, polled every {POLL} s):")
        print("\n".join(f"  {line}" for line in TIMINGS))
    (a, job_a, info_a), (b, job_b, info_b) = runs["preempted"], runs["straight"]
    log_a = job_log(a, job_a).read_text()  # the job's stdout, appended across the two runs
    assert info_a["JobState"] == "COMPLETED" and info_a["ExitCode"] == "0:0", log_a[-3000:]
    assert info_b["JobState"] == "COMPLETED" and info_b["ExitCode"] == "0:0", tail(job_log(b, job_b))
    assert info_a["Restarts"] == "1" and info_b["Restarts"] == "0"  # requeued once, under the same job id
    launch = check_log_dir(a / "logs", "finetune", job_a, runs=2)
    assert "received SIGUSR1" in launch and "requeueing: scontrol requeue" in launch, launch
    assert "restart 1)" in launch and "restart 0)" in launch, launch
    check_log_dir(b / "logs", "finetune", job_b, runs=1)
    stopped = re.search(r"preempted at step (\d+)", log_a)
    assert stopped, log_a[-3000:]
    step = int(stopped[1])
    assert 3 <= step < FINETUNE_STEPS
    exp_a = a / "results" / "finetune-DiT-Ti-4"
    ckpts = exp_a / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.pt")) == [f"{step:07d}.pt", f"{FINETUNE_STEPS:07d}.pt"]
    assert load_file(ckpts / f"{step:07d}.pt")["train_steps"] == step
    assert f"resumed from {ckpts / f'{step:07d}.pt'} at step {step}" in log_a
    # each step logged once: the first run up to the checkpoint, the requeued one from there on
    steps = [json.loads(line)["step"] for line in (exp_a / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, FINETUNE_STEPS + 1)), steps
    final_a = load_file(ckpts / f"{FINETUNE_STEPS:07d}.pt")
    final_b = load_file(b / "results" / "finetune-DiT-Ti-4" / "checkpoints" / f"{FINETUNE_STEPS:07d}.pt")
    assert final_a["train_steps"] == final_b["train_steps"] == FINETUNE_STEPS
    assert_same_state(final_a, final_b)  # model and EMA tensor by tensor, and the optimizer moments
