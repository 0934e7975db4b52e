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


def dit_bench_setup(args) -> tuple[torch.device, str, str, float]:
    """The device, precision and matmul rate a DiT benchmark measures against: (device, precision, the matmul
    precision of the rate (TF32 for fp32 on CUDA, where it is on), the rate in FLOP/s)."""
    from diffcompress.distributed import resolve_precision

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    precision = resolve_precision(args.precision, device)
    peak_precision = "tf32" if precision == "fp32" and device.type == "cuda" else precision
    return device, precision, peak_precision, matmul_rate(device, peak_precision, args.matmul_size)


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


# Which backward products a training step computes, by what it trains (see dit_step_flops).
STEP_MODES = ("full", "frozen", "delta_w", "lora")


def dit_step_flops(
    model: DiT, batch: int, mode: str = "full", checkpointing: bool = False, lora_rank: int = 0
) -> float:
    """Analytic FLOPs of one training step (forward, backward, and the blocks' recomputed forward under
    gradient checkpointing), counting only the products autograd really computes. A linear layer's
    backward costs its forward once for the input gradient (when its input depends on something
    trained) and once for the weight gradient (when the weight is trained); attention's two T x T
    products cost twice their forward when q, k, v need gradients.

    mode: ``full`` trains every weight (train.py, the Masked KD student); ``frozen`` trains only the
    pruning gates: no weight gradients at all, and block 0 needs none since its input and weights are
    fixed (the gates mix block outputs, so gradients flow from block 1 on); ``delta_w`` trains every
    weight (and the gates); ``lora`` trains rank-``lora_rank`` adapters on every linear (timestep MLP,
    blocks incl. adaLN, final layer).
    """
    if mode not in STEP_MODES:
        raise ValueError(f"mode must be one of {STEP_MODES}, got {mode!r}")
    tokens = model.x_embedder.num_patches
    width = model.pos_embed.shape[-1]
    full = mode in ("full", "delta_w")  # --delta-w trains every weight, as the authors' script
    adapters = mode == "lora"  # --delta-w --lora: adapters on every Linear, c depends on the timestep MLP's

    def linear(layer: torch.nn.Module, per: int, dx: bool, dw: bool) -> tuple[float, float]:
        """(forward, backward) FLOPs of one linear/conv applied ``per`` times per sample."""
        f = 2 * layer.weight.numel() * per
        return f, f * (int(dx) + int(dw))

    def lora(layer: torch.nn.Module, per: int, dx: bool) -> tuple[float, float]:
        """Adapter B(A(x)): forward; backward = both weight grads, B's input grad, and A's when x needs one."""
        if mode != "lora":
            return 0.0, 0.0
        out_f, in_f = layer.weight.shape[:2]
        fa, fb = 2 * lora_rank * in_f * per, 2 * lora_rank * out_f * per
        return fa + fb, fa + 2 * fb + (fa if dx else 0)

    fwd = bwd = 0.0
    for layer, per, dx in (
        (model.x_embedder.proj, tokens, False),
        (model.t_embedder.mlp[0], 1, False),
        (model.t_embedder.mlp[2], 1, full or adapters),
        (model.final_layer.adaLN_modulation[-1], 1, full or adapters),
        (model.final_layer.linear, tokens, True),  # its input mixes gated blocks: always needs a gradient
    ):
        f, b = linear(layer, per, dx, full)
        lf, lb = lora(layer, per, dx) if layer is not model.x_embedder.proj else (0.0, 0.0)
        fwd, bwd = fwd + f + lf, bwd + b + lb
    recompute = 0.0
    for i, block in enumerate(model.blocks):
        # frozen: nothing before block 1 depends on a trained tensor; otherwise everything in a block does
        grad_inside = mode != "frozen" or i > 0
        fb = bb = 0.0
        for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            base = getattr(layer, "base_layer", layer)  # LoRA wraps the original linear
            f, b = linear(base, tokens, grad_inside, full)
            lf, lb = lora(base, tokens, grad_inside)
            fb, bb = fb + f + lf, bb + b + lb
        ada = block.adaLN_modulation[-1]
        ada = getattr(ada, "base_layer", ada)
        f, b = linear(ada, 1, full or adapters, full)  # its input, c, depends on trained weights unless frozen
        lf, lb = lora(ada, 1, full or adapters)
        attn = 4 * tokens * tokens * width
        fb, bb = fb + f + lf + attn, bb + b + lb + (2 * attn if grad_inside else 0)
        fwd, bwd = fwd + fb, bwd + bb
        if checkpointing and grad_inside:  # a block autograd never enters is not recomputed
            recompute += fb
    return batch * (fwd + bwd + recompute)
