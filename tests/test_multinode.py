"""Multi-node launches without a cluster: two launchers on loopback, each a "node" of one process.

train.py and prune_by_learning.py run under torchrun's c10d rendezvous (the command of scripts/cluster/common.sh:
``--nnodes 2 --node_rank k --rdzv_backend c10d``); aptp.prune under ``accelerate launch --num_machines 2
--machine_rank k`` (accelerate's default static rendezvous). Each run must equal, bit for bit, a single-node
2-process run with the same global batch and seed: a rank does the same maths whichever node it is on. And only
global rank 0 may write: both "nodes" have LOCAL_RANK 0 and share this file system, so anything gated on the local
rank would be written twice (the append-mode metrics and log would show it).
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist

from aptp.make_tiny import build_world
from diffcompress.checkpoint import load_file, read_metadata

from .conftest import ROOT, TOY_FLAGS
from .test_train import TINY_ARGS, assert_same_state, make_features


def _gloo_problem() -> str | None:
    if not dist.is_available() or not dist.is_gloo_available():
        return "this torch has no gloo backend"
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
    except OSError as e:
        return f"no loopback network ({e})"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_gloo_problem() is not None, reason=f"multi-node on loopback: {_gloo_problem()}"),
]

TIMEOUT = 300  # seconds for one launch (all its launchers); a failed or stuck launch kills every launcher


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held together while chosen, so that concurrent launches cannot share one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launcher_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a test runner inside a launcher must not leak its own rendezvous
    return env


def stop(proc: subprocess.Popen) -> None:
    """Stop a launcher and its workers. torchrun starts each worker in a session of its own, so killing the
    launcher's group would orphan them, blocked in a collective until gloo's timeout: SIGTERM the launcher first
    (it stops its workers), then SIGKILL whatever is left of its process tree."""
    try:
        workers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        workers = []
    proc.terminate()  # waited for by Popen, not psutil: a child reaped by psutil would read as exit code 0
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for p in psutil.wait_procs(workers, timeout=10)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def launch(cmds: list[list[str]], logs: str) -> list[str]:
    """Start the launchers together, wait for all; return each one's output (stdout + stderr). The multi-node run
    and its single-node reference start together: on two cores their imports and rendezvous overlap.

    If one fails, or time runs out, the others are killed at once: they would wait for the missing node."""
    env = launcher_env()
    procs, files = [], []
    try:
        for i, cmd in enumerate(cmds):
            files.append(open(f"{logs}{i}.log", "w+"))
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=files[-1], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        running = [i for i, p in enumerate(procs) if p.poll() is None]
        for i in running:
            stop(procs[i])
    outputs = []
    for f in files:
        f.seek(0)
        outputs.append(f.read())
        f.close()
    for i in sorted(range(len(procs)), key=lambda i: i in running):  # the one that failed first, if any
        why = (
            f"still running after {TIMEOUT} s or after another failed"
            if i in running
            else f"exited {procs[i].returncode}"
        )
        assert procs[i].returncode == 0 and i not in running, (
            f"launcher {i} of {len(procs)} {why}:\n{outputs[i][-4000:]}"
        )
    return outputs


def torchrun_two_nodes(entry: list[str], run_id: str, port: int) -> list[list[str]]:
    """Node 0 and node 1, one process each, meeting at a c10d rendezvous on loopback (both launchers think they
    are the endpoint's host: torch lets the first one host the store and the other join as a client)."""
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id,
              "--max_restarts", "0"]  # fmt: skip
    return [[*common, "--node_rank", str(node), *entry] for node in (0, 1)]


def torchrun_one_node(entry: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(port), *entry]  # fmt: skip


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in records]


def written_once(outputs: list[str], line: str) -> None:
    """``line`` was printed by exactly one process of all the launchers'."""
    counts = [out.count(line) for out in outputs]
    assert sum(counts) == 1, f"{line!r} printed {counts} times by the launchers"


def no_temporaries(folder) -> None:
    left = [p for p in folder.rglob(".*") if p.is_file()]
    assert not left, f"temporary files left: {left}"


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features"))


# ------------------------------------------------------------------------------------ torchrun, c10d


def test_train_two_nodes_equal_one_node(features, tmp_path):
    # --resume auto: with no checkpoint yet every rank must agree on "from scratch" (rank 0's pick is broadcast)
    entry = [str(ROOT / "train.py"), *TINY_ARGS, "--device", "cpu", "--data-path", str(features), "--prefix", "t",
             "--max-steps", "4", "--log-every", "1", "--ckpt-every", "2", "--resume", "auto"]  # fmt: skip
    ports = free_ports(2)
    *nodes, _ = launch([*torchrun_two_nodes([*entry, "--results-dir", str(tmp_path / "multi")], "train", ports[0]),
                        torchrun_one_node([*entry, "--results-dir", str(tmp_path / "single")], ports[1])],
                       f"{tmp_path}/launcher")  # fmt: skip
    multi, single = tmp_path / "multi" / "t-DiT-Ti-4", tmp_path / "single" / "t-DiT-Ti-4"

    # one writer: c10d ranks the nodes in the order they join (--node_rank is ignored), so either launcher may hold
    # global rank 0, but only one of them prints, logs and writes
    written_once(nodes, "done at step 4")
    assert len(jsonl(multi / "metrics.jsonl")) == 4 and (multi / "log.txt").read_text().count("done at step 4") == 1
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["0000002.pt", "0000004.pt"]
    no_temporaries(multi)

    # the same run as on one node: every logged loss and every tensor of both checkpoints
    assert without_timing(jsonl(multi / "metrics.jsonl")) == without_timing(jsonl(single / "metrics.jsonl"))
    for name in ("0000002.pt", "0000004.pt"):
        assert_same_state(load_file(multi / "checkpoints" / name), load_file(single / "checkpoints" / name))


def test_prune_by_learning_two_nodes_equal_one_node(features, tmp_path):
    def entry(results):
        return [str(ROOT / "prune_by_learning.py"), "--model", "DiT-Ti/4", "--groups", "1:2", "--device", "cpu",
                "--data-path", str(features), "--results-dir", str(results), *TOY_FLAGS, "--max-steps", "4",
                "--log-every", "2", "--delta-w", "--lora", "--save-model", str(results / "d6.pt")]  # fmt: skip

    ports = free_ports(2)
    *nodes, _ = launch([*torchrun_two_nodes(entry(tmp_path / "multi"), "prune", ports[0]),
                        torchrun_one_node(entry(tmp_path / "single"), ports[1])], f"{tmp_path}/launcher")  # fmt: skip
    multi, single = tmp_path / "multi", tmp_path / "single"
    exp = "prune-DiT-Ti-4"

    written_once(nodes, "kept 6/12 layers")
    assert [r["step"] for r in jsonl(multi / exp / "metrics.jsonl")] == [2, 4]
    assert (multi / exp / "decisions.png").is_file()
    no_temporaries(multi)

    # the same decisions, the same saved shallow model and the same training state as on one node
    assert read_metadata(multi / "d6.pt") == read_metadata(single / "d6.pt")
    assert len(read_metadata(multi / "d6.pt")["kept_indices"]) == 6
    a, b = (torch.load(r / "d6.pt", weights_only=True) for r in (multi, single))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    decisions = [json.loads((r / exp / "decisions.json").read_text()) for r in (multi, single)]
    assert decisions[0] == decisions[1]
    assert_same_state(*(load_file(r / exp / "checkpoints" / "0000004.pt") for r in (multi, single)))


# ------------------------------------------------------------------------------------ accelerate, two machines


@pytest.fixture(scope="module")
def aptp_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("aptp-tiny")
    tiny = build_world(root, train_rows=16, val_rows=2, size=40)
    return [f"pretrained_model_name_or_path={tiny['sd']}", f"data.data_dir={tiny['cc3m']}",
            f"model.prompt_encoder={tiny['encoder']}", "data.dataloader_num_workers=0"]  # fmt: skip


def accelerate_cmd(machines: int, rank: int, port: int, args: list[str]) -> list[str]:
    """2 processes in all (gloo on CPU, as the 2-process test of aptp.prune), over ``machines`` machines."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port)]  # fmt: skip
    if machines > 1:
        cmd += ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
    return [*cmd, "-m", "aptp.prune", "--config", str(ROOT / "configs/aptp/pruning/tiny.yaml"), *args]


def test_aptp_prune_two_machines_equal_one_machine(aptp_world, tmp_path):
    def args(run):
        return [*aptp_world, f"output_dir={tmp_path / run}", f"data.embedding_cache_dir={tmp_path / run / 'cache'}",
                "training.max_train_steps=2", "training.pretrain_steps=1", "logging.logging_steps=1",
                "logging.checkpointing_steps=2", "logging.resume_from_checkpoint=latest"]  # fmt: skip

    ports = free_ports(2)
    *machines, _ = launch([*(accelerate_cmd(2, rank, ports[0], args("multi")) for rank in (0, 1)),
                           accelerate_cmd(1, 0, ports[1], args("single"))], f"{tmp_path}/launcher")  # fmt: skip
    multi, single = tmp_path / "multi", tmp_path / "single"

    # static rendezvous: --machine_rank 0 holds global rank 0, the only writer
    assert "expert codes:" in machines[0] and "expert codes:" not in machines[1]
    written_once(machines, "prompt embeddings of 15 captions computed over 2 process(es)")
    assert [r["step"] for r in jsonl(multi / "metrics.jsonl")] == [1, 2]
    assert (multi / "log.txt").read_text().count("saved ") == 1
    # every process saved its own RNG state, named by its global index (a local index would give two _0 files)
    assert {"router.pt", "state.json", "random_states_0.pkl", "random_states_1.pkl"} <= {
        p.name for p in (multi / "checkpoints" / "checkpoint-2").iterdir()
    }
    no_temporaries(multi)

    # the embedding cache: built by both machines' processes, one file, the same numbers as one machine's
    caches = [sorted((r / "cache").iterdir()) for r in (multi, single)]
    assert len(caches[0]) == 1 and caches[0][0].name == caches[1][0].name
    np.testing.assert_array_equal(np.load(caches[0][0]), np.load(caches[1][0]))

    # sane experts, and the same router and metrics as on one machine
    experts = json.loads((multi / "experts.json").read_text())
    assert len(experts["experts"]) == 4
    for e in experts["experts"]:
        assert set(e["code"]) <= {0, 1} and 0 < e["macs"] <= experts["dense"]["macs"]
        assert 0 < e["params"] <= experts["dense"]["params"]
    assert experts == json.loads((single / "experts.json").read_text())
    a, b = (torch.load(r / "router.pt", weights_only=True) for r in (multi, single))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert without_timing(jsonl(multi / "metrics.jsonl")) == without_timing(jsonl(single / "metrics.jsonl"))
