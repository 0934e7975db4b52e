"""What every benchmark shares: the machine's measured matmul rate, analytic DiT FLOPs, timing, and tables."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from models_with_layer_pruning import DiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_rate(device: torch.device, precision: str, n: int | None = None) -> float:
    """Achieved FLOP/s of an n^3 matmul in ``precision`` (tf32 = fp32 inputs with TF32 tensor cores on CUDA):
    the machine's practical peak that the other figures are a share of."""
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = torch.float32 if precision == "tf32" else DTYPES[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        seconds = timed(lambda: a @ b, device, repeats=5, warmup=2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / seconds


def dit_forward_flops(model: DiT, batch: int = 1) -> float:
    """FLOPs of one forward pass: 2 x weights x tokens for the linear layers applied per token (patch embedding,
    attention projections, MLP, final layer), attention's two T x T x d products, and 2 x weights once per
    sample for the conditioning (timestep MLP, adaLN modulation), which matters only at a few tokens."""
    tokens = model.x_embedder.num_patches
    per_token = model.x_embedder.proj.weight.numel() + model.final_layer.linear.weight.numel()
    per_sample = model.final_layer.adaLN_modulation[-1].weight.numel()
    per_sample += sum(m.weight.numel() for m in model.t_embedder.mlp if isinstance(m, torch.nn.Linear))
    for block in model.blocks:
        per_token += sum(m.weight.numel() for m in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
        per_sample += block.adaLN_modulation[-1].weight.numel()
    width = model.pos_embed.shape[-1]
    attention = 2 * 2 * tokens * tokens * width * len(model.blocks)
    return batch * (2 * per_token * tokens + attention + 2 * per_sample)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    info = {"torch": torch.__version__, "cpu": cpu, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Markdown table; ``columns`` are (key, header, format)."""
    print("| " + " | ".join(h for _, h, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [format(row[k], f) if row.get(k) is not None else "-" for k, _, f in columns]
        print("| " + " | ".join(cells) + " |")


def write_json(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
