"""Devices, precision and process groups: the one place that knows how a script is launched.

Every script runs as plain ``python script.py`` (one process, CPU or one GPU) or under ``torchrun``
(any number of processes and nodes; nccl on CUDA, gloo on CPU). Multi-node jobs get their rendezvous
from torchrun, so SLURM/PBS scripts only have to call it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None, timeout_minutes: float = 30) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone.

    ``device``: "cuda", "cpu" or None (CUDA when available). Each rank takes the GPU of its local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        set_tf32(dev, True)  # as DiT; --no-tf32 turns it off again
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **kwargs)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """The device a ``--device`` value names (None: CUDA when available, else CPU), checked here so that a missing
    GPU or a mistyped name is one line, not a CUDA traceback. ``cuda`` takes the GPU of the local rank."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(want)
    except RuntimeError:
        raise UserError(f"--device {want!r}: expected cuda, cuda:N or cpu") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise UserError(f"--device {want}: no CUDA device is available on this machine; use --device cpu")
    index = local_rank if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise UserError(
            f"--device {want}: this machine has {torch.cuda.device_count()} CUDA device(s), no cuda:{index}"
        )
    return torch.device("cuda", index)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (``x`` itself when running alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def seed_everything(global_seed: int, rank: int = 0, world_size: int = 1) -> int:
    """Seed python, numpy and torch with a distinct seed per rank (global_seed * world_size + rank)."""
    seed = global_seed * world_size + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def per_rank_batch(global_batch_size: int, world_size: int) -> int:
    """Split a global batch over ranks; refuse a split that is not exact."""
    if global_batch_size % world_size:
        raise ValueError(
            f"--global-batch-size {global_batch_size} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size}"
        )
    return global_batch_size // world_size


# ---------------------------------------------------------------------------------------- precision

PRECISIONS = ("fp32", "bf16", "fp16")


def set_tf32(device: torch.device, enabled: bool) -> bool:
    """TF32 matmuls and convolutions on CUDA (DiT's default); returns whether they are on (never on a CPU)."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """``None``/"auto" -> bf16 on CUDA, fp32 on CPU; otherwise the requested one (validated)."""
    if precision in (None, "auto"):
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)} or auto, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------ logging


def get_logger(
    name: str = "diffcompress", log_dir: str | os.PathLike | None = None, rank: int | None = None
) -> logging.Logger:
    """A logger that prints (and writes ``log_dir/log.txt``) on rank 0 and stays silent elsewhere."""
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    logger = logging.getLogger(f"{name}.rank{rank}")
    logger.propagate = False
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)
    if rank != 0:
        logger.addHandler(logging.NullHandler())
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    return logger
