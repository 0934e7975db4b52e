"""The SLURM and PBS batch scripts: syntax, the rendezvous they derive from each scheduler's environment,
and real runs of the PBS scripts under a simulated PBS (PBS_JOBID, PBS_NODEFILE, ... on loopback): pruning,
then fine-tuning the pruned model, preempted by SIGTERM, requeued and resumed to the uninterrupted result."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from diffcompress.checkpoint import load_file, read_metadata

from .conftest import ROOT
from .test_train import make_features

pytestmark = pytest.mark.slow

SCRIPTS = ROOT / "scripts"
STAGES = ["extract_features", "prune_by_learning", "finetune", "masked_kd", "sample_ddp", "evaluate",
          "aptp_prune", "aptp_filter", "aptp_finetune", "aptp_generate"]  # fmt: skip
ALL_SCRIPTS = sorted([*SCRIPTS.glob("slurm/*.sbatch"), *SCRIPTS.glob("pbs/*.pbs"), *SCRIPTS.glob("cluster/*.sh")])
# read by the scripts besides their own variables: cleared, so that a test run inside a real job is not confused
LEAKY = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "GPUS_PER_NODE", "NGPUS",
         "JOB_ID", "JOB_NAME", "REQUEUE_CMD", "REQUEUE_SIGNALS", "EXTRA_ARGS", "LOG_ROOT", "DEVICE", "REPO_DIR",
         "PBS_REMOTE", "CLUSTER_HOSTNAME", "DRY_RUN", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # fmt: skip


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "SBATCH_")) and k not in LEAKY}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------- syntax


def test_every_stage_has_both_scripts():
    for stage in STAGES:
        assert (SCRIPTS / "slurm" / f"{stage}.sbatch").is_file(), stage
        assert (SCRIPTS / "pbs" / f"{stage}.pbs").is_file(), stage
    assert len(list(SCRIPTS.glob("slurm/*.sbatch"))) == len(list(SCRIPTS.glob("pbs/*.pbs"))) == len(STAGES)


@pytest.mark.parametrize("path", ALL_SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_parses_and_is_thin(path):
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    if path.parent.name == "cluster":
        return
    assert text.startswith("#!/bin/bash\n")
    assert "source scripts/cluster/common.sh" in text and "cluster_run " in text
    assert "cluster_extra_args" in text and '"${EXTRA[@]}"' in text  # EXTRA_ARGS reach the entry point
    if path.suffix == ".sbatch":
        for directive in ("--requeue", "--open-mode=append", "--signal=B:USR1@"):
            assert f"#SBATCH {directive}" in text, directive
    else:
        assert "#PBS -r y" in text
    if "--array" in text or "#PBS -J" in text:
        assert "ARRAY_INDEX" in text
    if path.stem in ("prune_by_learning", "finetune", "masked_kd"):
        assert "--resume auto" in text
    if path.stem in ("aptp_prune", "aptp_finetune"):
        assert "logging.resume_from_checkpoint=latest" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt install shellcheck)")
def test_shellcheck_is_clean():
    # common.sh and node.sh on their own; the stage scripts without following their `source` (SC1091)
    cluster = [str(p) for p in ALL_SCRIPTS if p.parent.name == "cluster"]
    stages = [str(p) for p in ALL_SCRIPTS if p.parent.name != "cluster"]
    for paths, flags in ((cluster, []), (stages, ["-e", "SC1091"])):
        out = subprocess.run(["shellcheck", "-s", "bash", *flags, *paths], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-4000:]


# --------------------------------------------------------------------------------------- rendezvous

SHOW = (
    "source scripts/cluster/common.sh; for v in SCHEDULER JOB_ID NNODES NODE_RANK MASTER_ADDR MASTER_PORT "
    'NPROC_PER_NODE ARRAY_INDEX LOG_DIR REQUEUE_CMD; do echo "$v=${!v}"; done'
)


def rendezvous(env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(["bash", "-c", SHOW], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return dict(line.split("=", 1) for line in out.stdout.splitlines())


@pytest.fixture()
def fake_scontrol(tmp_path):
    """`scontrol show hostnames node[01-02]` as Slurm answers it (where no Slurm is installed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = '#!/bin/bash\n[[ "$*" == "show hostnames node[01-02]" ]] && printf "node01\\nnode02\\n"\n'
    (bin_dir / "scontrol").write_text(script)
    (bin_dir / "scontrol").chmod(0o755)
    return str(bin_dir)


def slurm_env(fake_scontrol, node_id: int, **extra) -> dict[str, str]:
    job = dict(SLURM_JOB_ID="4242", SLURM_JOB_NAME="finetune", SLURM_JOB_NODELIST="node[01-02]",
               SLURM_JOB_NUM_NODES="2", SLURM_NODEID=str(node_id), SLURM_GPUS_ON_NODE="4")  # fmt: skip
    return clean_env(PATH=f"{fake_scontrol}:{os.environ['PATH']}", **{**job, **extra})


def test_slurm_rendezvous(fake_scontrol):
    nodes = [rendezvous(slurm_env(fake_scontrol, i)) for i in range(2)]
    for i, r in enumerate(nodes):
        assert r["SCHEDULER"] == "slurm" and r["JOB_ID"] == "4242" and r["NNODES"] == "2"
        assert r["NODE_RANK"] == str(i) and r["MASTER_ADDR"] == "node01" and r["NPROC_PER_NODE"] == "4"
        assert r["LOG_DIR"] == "logs/finetune-4242" and r["REQUEUE_CMD"] == "scontrol requeue 4242"
    assert nodes[0]["MASTER_PORT"] == nodes[1]["MASTER_PORT"]  # derived from the job id: every node agrees
    assert 20000 <= int(nodes[0]["MASTER_PORT"]) < 40000
    assert rendezvous(slurm_env(fake_scontrol, 0, SLURM_JOB_ID="4243"))["MASTER_PORT"] != nodes[0]["MASTER_PORT"]
    array = rendezvous(slurm_env(fake_scontrol, 0, SLURM_ARRAY_JOB_ID="4240", SLURM_ARRAY_TASK_ID="3"))
    assert array["JOB_ID"] == "4240_3" and array["ARRAY_INDEX"] == "3"
    pinned = rendezvous(slurm_env(fake_scontrol, 1, MASTER_PORT="29555", NPROC_PER_NODE="2", DEVICE="cpu"))
    assert pinned["MASTER_PORT"] == "29555" and pinned["NPROC_PER_NODE"] == "2"
    assert rendezvous(slurm_env(fake_scontrol, 1, DEVICE="cpu"))["NPROC_PER_NODE"] == "1"


def pbs_env(tmp_path, hostname: str, **extra) -> dict[str, str]:
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("hostA.cluster\nhostA.cluster\nhostB.cluster\nhostB.cluster\n")  # a line per chunk cpu
    job = dict(PBS_JOBID="77[3].pbs-server", PBS_JOBNAME="aptp-finetune", PBS_NODEFILE=str(nodefile),
               PBS_O_WORKDIR=str(ROOT), PBS_ARRAY_INDEX="3", CLUSTER_HOSTNAME=hostname, NGPUS="8")  # fmt: skip
    return clean_env(**{**job, **extra})


def test_pbs_rendezvous(tmp_path):
    nodes = [rendezvous(pbs_env(tmp_path, host)) for host in ("hostA", "hostB.cluster")]  # short or full names
    for i, r in enumerate(nodes):
        assert r["SCHEDULER"] == "pbs" and r["NNODES"] == "2" and r["NODE_RANK"] == str(i)
        assert r["MASTER_ADDR"] == "hostA.cluster" and r["NPROC_PER_NODE"] == "8" and r["ARRAY_INDEX"] == "3"
        assert r["LOG_DIR"] == "logs/aptp-finetune-77_3_.pbs-server"
        assert r["REQUEUE_CMD"] == "qrerun 77[3].pbs-server"
    assert nodes[0]["MASTER_PORT"] == nodes[1]["MASTER_PORT"]


def dry_launch(env: dict[str, str], launcher: str, entry: str) -> list[str]:
    """The node commands cluster_run would start (DRY_RUN=1 prints them), then the settings it wrote."""
    script = f"source scripts/cluster/common.sh; cluster_run {launcher} {entry} --flag 1; cat $LOG_DIR/settings.env"
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env={**env, "DRY_RUN": "1"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if not line.startswith("[")]


def test_multi_node_launch_commands(tmp_path, fake_scontrol):
    """What each scheduler starts on its nodes, and the launchers' flags."""
    logs = str(tmp_path / "logs")
    slurm = dry_launch(slurm_env(fake_scontrol, 0, LOG_ROOT=logs), "torchrun", "train.py")
    assert slurm[0].startswith("DRY_RUN: srun --nodes 2 --ntasks 2 --ntasks-per-node 1 ")
    port = rendezvous(slurm_env(fake_scontrol, 0))["MASTER_PORT"]
    expected = (
        f"'--nnodes' '2' '--nproc_per_node' '4' '--rdzv_backend' 'c10d' "
        f"'--rdzv_endpoint' 'node01:{port}' '--rdzv_id' '4242' 'train.py' '--flag' '1'"
    )
    assert expected in "\n".join(slurm)

    pbs = dry_launch(pbs_env(tmp_path, "hostA", LOG_ROOT=logs), "accelerate", "-m aptp.prune")
    assert pbs[0].startswith("DRY_RUN: bash ") and pbs[0].endswith("/settings.env 0")
    assert pbs[1].startswith("DRY_RUN: pbsdsh -n 2 -- /bin/bash ") and pbs[1].endswith(" 1")  # hostB's first line
    settings = "\n".join(pbs)
    assert "'--num_machines' '2' '--machine_rank' '@NODE_RANK@' '--main_process_ip' 'hostA.cluster'" in settings
    assert "'--num_processes' '16'" in settings and "'--multi_gpu' '-m' 'aptp.prune' '--flag' '1'" in settings

    ssh = dry_launch(pbs_env(tmp_path, "hostA", LOG_ROOT=logs, PBS_REMOTE="ssh {host}"), "torchrun", "train.py")
    assert ssh[1].startswith("DRY_RUN: ssh hostB.cluster /bin/bash ")


def test_exit_status_and_signal_before_launch(tmp_path):
    """The entry point's exit status is the job's; a signal that arrives before the launch starts nothing."""
    (tmp_path / "one").write_text("hostA\n")
    env = pbs_env(tmp_path, "hostA", LOG_ROOT=str(tmp_path / "logs"), PBS_NODEFILE=str(tmp_path / "one"),
                  REQUEUE_CMD=f"echo requeued >> {tmp_path / 'requeued'}")  # fmt: skip
    script = "source scripts/cluster/common.sh; cluster_run python -c 'exit(3)'"
    failing = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert failing.returncode == 3, failing.stdout + failing.stderr
    log_dir = tmp_path / "logs" / "aptp-finetune-77_3_.pbs-server"
    assert "run end: status 3" in (log_dir / "launch.log").read_text()
    assert not (tmp_path / "requeued").exists()
    script = f'source scripts/cluster/common.sh; kill -TERM $$; cluster_run python -c \'open("{tmp_path}/ran", "w")\''
    early = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert early.returncode == 0, early.stdout + early.stderr
    assert not (tmp_path / "ran").exists() and (tmp_path / "requeued").read_text() == "requeued\n"


# --------------------------------------------------------------------- real runs under a simulated PBS

TINY_EXTRA = "--num-classes 4 --num-workers 0"


def simulated_pbs(tmp_path: Path, job_id: str, job_name: str, **extra) -> dict[str, str]:
    """A PBS job on this machine: one host (localhost) in PBS_NODEFILE, requeue recorded in a file."""
    nodefile = tmp_path / "pbs_nodefile"
    nodefile.write_text("localhost\n")
    return clean_env(PBS_JOBID=job_id, PBS_JOBNAME=job_name, PBS_NODEFILE=str(nodefile), PBS_O_WORKDIR=str(ROOT),
                     LOG_ROOT=str(tmp_path / "logs"), REQUEUE_CMD=f"echo $PBS_JOBID >> {tmp_path / 'requeued'}",
                     DEVICE="cpu", IMAGE_SIZE="64", GLOBAL_BATCH_SIZE="8", **extra)  # fmt: skip


def run_pbs(stage: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # the environment is what `qsub -V` passes; PBS starts the job in $HOME and the script moves to PBS_O_WORKDIR
    script = str(SCRIPTS / "pbs" / f"{stage}.pbs")
    out = subprocess.run(["bash", script], env=env, cwd=Path.home(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    make_features(root / "features", n=48)
    return root


@pytest.fixture(scope="module")
def pruned(workdir):
    """prune_by_learning.pbs on 2 "nodes" x 1 process: DiT-Ti/4 (12 blocks) in 1:2 groups -> 6 blocks, LoRA.

    The second node is 127.0.0.1, started by PBS_REMOTE as a local process instead of through pbsdsh."""
    env = simulated_pbs(workdir, "101.sim", "prune", MODEL="DiT-Ti/4", LOAD_WEIGHT="", MAX_STEPS="10",
                        DATA_PATH=str(workdir / "features"), RESULTS_DIR=str(workdir / "results"),
                        SAVE_MODEL=str(workdir / "pruned" / "d6.pt"), NPROC_PER_NODE="1",
                        EXTRA_ARGS=f"--groups 1:2 {TINY_EXTRA} --log-every 5")  # fmt: skip
    (workdir / "two_nodes").write_text("localhost\nlocalhost\n127.0.0.1\n")
    env.update(PBS_NODEFILE=str(workdir / "two_nodes"), CLUSTER_HOSTNAME="localhost",
               PBS_REMOTE="env REMOTE_HOST={host} REMOTE_INDEX={index}")  # fmt: skip
    out = run_pbs("prune_by_learning", env)
    return workdir / "pruned" / "d6.pt", out


def test_pbs_prune_by_learning(pruned, workdir):
    path, out = pruned
    meta = read_metadata(path)
    assert len(meta["kept_indices"]) == 6 and meta["method"] == "learned"
    assert sum(k.endswith(".attn.qkv.weight") for k in load_file(path)) == 6
    assert (workdir / "results" / "prune-DiT-Ti-4" / "decisions.json").is_file()
    log_dir = workdir / "logs" / "prune-101.sim"
    # c10d numbers the nodes in the order they join (it ignores --node_rank), so global rank 0, which prints the
    # summary, may run on either node
    assert "kept 6/12 layers" in (log_dir / "node0.log").read_text() + (log_dir / "node1.log").read_text()
    assert "[node 1 on " in (log_dir / "node1.log").read_text()
    assert "launcher exited with status 0" in (log_dir / "node1.log").read_text()
    settings = (log_dir / "settings.env").read_text()
    assert "export SCHEDULER=pbs" in settings and "export MASTER_ADDR=localhost" in settings
    assert "'--nnodes' '2' '--nproc_per_node' '1'" in settings
    assert "run end: status 0" in (log_dir / "launch.log").read_text() and "run end: status 0" in out.stdout
    assert not (workdir / "requeued").exists()


def finetune_env(workdir, pruned_path, job_id, prefix):
    return simulated_pbs(workdir, job_id, "finetune", MODEL="DiT-Ti/4", LOAD_WEIGHT=str(pruned_path),
                         DATA_PATH=str(workdir / "features"), RESULTS_DIR=str(workdir / "results"), PREFIX=prefix,
                         MAX_STEPS="40", LOG_EVERY="1", CKPT_EVERY="100000", NPROC_PER_NODE="2",
                         EXTRA_ARGS=f"--depth 6 {TINY_EXTRA} --lr 1e-3")  # fmt: skip


@pytest.fixture(scope="module")
def finetuned(pruned, workdir):
    """finetune.pbs on the pruned model, 2 processes (gloo), uninterrupted."""
    run_pbs("finetune", finetune_env(workdir, pruned[0], "201.sim", "straight"))
    return workdir / "results" / "straight-DiT-Ti-4" / "checkpoints" / "0000040.pt"


def test_pbs_finetune(finetuned):
    state = load_file(finetuned)
    assert state["train_steps"] == 40 and state["args"]["depth"] == 6
    assert sum(k.endswith(".attn.qkv.weight") for k in state["model"]) == 6


def test_pbs_preemption_requeues_and_resumes_to_the_same_result(finetuned, pruned, workdir):
    env = finetune_env(workdir, pruned[0], "202.sim", "preempted")
    exp = workdir / "results" / "preempted-DiT-Ti-4"
    with open(workdir / "preempted.out", "w") as stdout:
        job = subprocess.Popen(["bash", str(SCRIPTS / "pbs" / "finetune.pbs")], env=env, stdout=stdout,
                               stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 400
        while not ((exp / "metrics.jsonl").is_file() and (exp / "metrics.jsonl").read_text().strip()):
            assert job.poll() is None and time.time() < deadline, "the job ended or hung before its first step"
            time.sleep(0.2)
        job.send_signal(signal.SIGTERM)  # what PBS sends the job's shell before killing it
        assert job.wait(timeout=300) == 0
    checkpoints = sorted((exp / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 1
    stopped = load_file(checkpoints[0])["train_steps"]
    assert 1 <= stopped < 40
    assert (workdir / "requeued").read_text() == "202.sim\n"  # the requeue command ran once, for this job
    log_dir = workdir / "logs" / "finetune-202.sim"
    launch = (log_dir / "launch.log").read_text()
    assert "received SIGTERM" in launch and "requeueing" in launch

    run_pbs("finetune", env)  # the requeued job: same id, same script, same variables
    final = load_file(exp / "checkpoints" / "0000040.pt")
    reference = load_file(finetuned)
    assert final["train_steps"] == 40
    for part in ("model", "ema"):
        for key, value in reference[part].items():
            assert torch.equal(final[part][key], value), f"{part}.{key} differs from the uninterrupted run"
    launch = (log_dir / "launch.log").read_text()
    assert launch.count(" run start ") == 2 and "restart 1" in launch and "run end: status 0" in launch
    assert f"resumed from {checkpoints[0]} at step {stopped}" in (log_dir / "node0.log").read_text()
    assert (workdir / "requeued").read_text() == "202.sim\n"
