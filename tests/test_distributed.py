"""Process groups, seeding, batch splitting, precision and logging; includes a real 2-process torchrun on CPU."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from diffcompress.distributed import (
    get_logger,
    per_rank_batch,
    resolve_precision,
    seed_everything,
    setup_distributed,
)

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from diffcompress.distributed import all_reduce_mean, cleanup, per_rank_batch, seed_everything, setup_distributed

    info = setup_distributed("cpu")
    mean = all_reduce_mean(torch.tensor([float(info.rank)])).item()
    seed = seed_everything(7, info.rank, info.world_size)
    draws = [torch.zeros(1) for _ in range(info.world_size)]
    dist.all_gather(draws, torch.rand(1))
    result = dict(
        rank=info.rank, env_rank=int(os.environ["RANK"]), world=info.world_size, distributed=info.distributed,
        mean=mean, seed=seed, draws=[d.item() for d in draws], batch=per_rank_batch(8, info.world_size),
    )
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as f:
        json.dump(result, f)
    cleanup()
    """
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["rank"] == res["env_rank"] == r
        assert res["world"] == 2 and res["distributed"]
        assert res["mean"] == pytest.approx(0.5)
        assert res["seed"] == 7 * 2 + r
        assert res["batch"] == 4
    assert results[0]["draws"] == results[1]["draws"]  # both ranks saw the same gathered values
    a, b = results[0]["draws"]
    assert a != b  # ...and each rank drew a different number


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = setup_distributed("cpu")
    assert (info.rank, info.world_size, info.device.type) == (0, 1, "cpu")
    assert info.is_main and not info.distributed
    assert not torch.distributed.is_initialized()


def test_per_rank_batch():
    assert per_rank_batch(8, 2) == 4
    with pytest.raises(ValueError, match="divisible"):
        per_rank_batch(10, 4)


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="bogus"):
        resolve_precision("bogus", cpu)


def test_seed_everything_is_reproducible():
    assert seed_everything(3, rank=1, world_size=4) == 13
    a = torch.rand(5)
    seed_everything(3, rank=1, world_size=4)
    assert torch.equal(torch.rand(5), a)
    seed_everything(3, rank=2, world_size=4)
    assert not torch.equal(torch.rand(5), a)


def test_logger_only_on_rank_zero(tmp_path, capsys):
    get_logger("t", log_dir=tmp_path / "r1", rank=1).info("from rank one")
    assert capsys.readouterr().out == ""
    assert not (tmp_path / "r1").exists()

    logger = get_logger("t", log_dir=tmp_path / "r0", rank=0)
    logger.info("from rank zero")
    for h in logger.handlers:
        h.flush()
    assert "from rank zero" in capsys.readouterr().out
    assert "from rank zero" in (tmp_path / "r0" / "log.txt").read_text()
    for h in logger.handlers:
        h.close()
