"""Training-step throughput of train.py, the Masked KD step and prune_by_learning.py (random weights and data:
speed does not depend on them).

python bench/training.py                                    # S/2, B/2 (XL/2 if memory allows), every step kind
python bench/training.py --models DiT-S/2 --kinds train --checkpointing both --compile both --batch-size 32
python bench/training.py --precision bf16 --batch-size 32   # a GPU: XL/2 too

Each row builds what the script builds (model, objective, fused AdamW, EMA) and times the loop's own
``diffcompress.trainer.TrainStep``. Kinds: ``train`` (train.py), ``kd`` (train_masked_kd.py: a student of half
the depth, the full-depth model as teacher), ``prune-frozen`` / ``prune-lora`` / ``prune-full``
(prune_by_learning.py with 1:2 groups: gates only, LoRA update, full delta-w). Achieved FLOP/s use the
analytic count of ``bench.common.dit_step_flops`` (only the products autograd computes; the KD teacher's forward
added), shown as a share of the matmul rate measured in the same run at the same precision. Peak memory is
CUDA's max_memory_allocated on a GPU; on a CPU, the peak resident set size (RSS, sampled by psutil every 2 ms)
above the RSS before the row's model was built.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dit_bench_setup, dit_forward_flops, dit_step_flops, machine, print_table, sync, write_json  # noqa: E402
from diffcompress.ema import create_ema  # noqa: E402
from diffcompress.trainer import TrainStep, compile_blocks, diffusion_objective, make_optimizer  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models_with_layer_pruning import create_model  # noqa: E402

KINDS = ("train", "kd", "prune-frozen", "prune-lora", "prune-full")
STEP_MODE = {"train": "full", "kd": "full", "prune-frozen": "frozen", "prune-lora": "lora", "prune-full": "delta_w"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["DiT-S/2", "DiT-B/2", "DiT-XL/2"])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--image-size", type=int, default=256, help="pixels; latents are 8x smaller (4 channels)")
    p.add_argument("--batch-size", type=int, default=None, help="per-step batch (default: 32 on GPU, 8 on CPU)")
    p.add_argument("--grad-accum-steps", type=int, default=1)
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="off", help="gradient checkpointing")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off", help="torch.compile the blocks")
    p.add_argument("--timed-steps", type=int, default=None, help="steps timed per row (default: 10 GPU, 2 CPU)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps first (default: 1; 3 compiled)")
    p.add_argument("--memory-margin", type=float, default=0.8, help="skip a row whose estimate exceeds this "
                   "share of the free memory")  # fmt: skip
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument(
        "--matmul-size", type=int, default=None, help="n of the n^3 peak matmul (default 8192 GPU, 2048 CPU)"
    )
    p.add_argument("--json-out", default="results/bench/training.json")
    return p.parse_args(argv)


class PeakRSS:
    """Peak resident set size of this process while inside the block, sampled by a thread."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.proc = interval, psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRSS:
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so a row's RSS starts low and its peak is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the RSS figures then include earlier rows' freed memory
        pass


def step_args(kind: str, args: argparse.Namespace) -> argparse.Namespace:
    """The scripts' flags for one kind, at their defaults where the bench does not choose."""
    import prune_by_learning
    import train_masked_kd

    if kind == "kd":
        return train_masked_kd.parse_args(["--data-path", "-", "--load-teacher", "-"])
    ns = prune_by_learning.parse_args(["--data-path", "-"])
    ns.lora, ns.delta_w, ns.lora_rank = kind == "prune-lora", kind in ("prune-lora", "prune-full"), args.lora_rank
    return ns


def build(name: str, kind: str, args: argparse.Namespace, device: torch.device, latent: int):
    """(model, objective, param groups, extra forward FLOPs per step): what the script would train."""
    import prune_by_learning
    import train_masked_kd

    shape = dict(input_size=latent, num_classes=1000)
    if kind == "train":
        model = create_model(name, **shape)
        return model, diffusion_objective(create_diffusion("")), None, 0.0
    if kind == "kd":
        teacher = create_model(name, **shape).to(device)
        model = create_model(name, depth=teacher.depth // 2, **shape)
        pairs = train_masked_kd.default_pairs(None, model.depth, teacher.depth)
        objective = train_masked_kd.MaskedKD(model, teacher, pairs, step_args(kind, args), max_steps=1000)
        if args.compile_now:
            compile_blocks(teacher)
        return model, objective, None, dit_forward_flops(teacher, args.batch_size)
    ns = step_args(kind, args)
    model = create_model(name, groups="1:2", **shape)
    model, groups = prune_by_learning.configure_trainable(model, ns)
    return model, prune_by_learning.pruning_objective(ns, max_steps=1000), groups, 0.0


def estimate_bytes(name: str, kind: str, args: argparse.Namespace, latent: int) -> float:
    """Weights, EMA, grads and AdamW moments (fp32), plus activations ~ 40 floats per token-width per block
    per sample (x3 without checkpointing): a rough bound to skip rows that cannot fit."""
    with torch.device("meta"):
        m = create_model(name, input_size=latent, num_classes=1000)
    params = m.num_params()
    width, tokens = m.pos_embed.shape[-1], m.x_embedder.num_patches
    trained = params if kind in ("train", "kd", "prune-full") else 0
    weights = params * 4 * (2 if kind == "train" else 1.5 if kind == "kd" else 2)  # + EMA (KD: half-depth student)
    optim = trained * 4 * 3
    acts = 40 * width * tokens * m.depth * args.batch_size / args.grad_accum_steps * 4
    return weights + optim + acts * (1 if args.checkpointing_now else 3)


def bench_row(name: str, kind: str, args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    latent = args.image_size // 8
    row = {"model": name, "kind": kind, "batch": args.batch_size, "ckpt": args.checkpointing_now,
           "compile": args.compile_now, "precision": precision}  # fmt: skip
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    need = estimate_bytes(name, kind, args, latent)
    if need > args.memory_margin * free:
        row["skipped"] = f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
        return row
    gc.collect()
    _return_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    with PeakRSS() as rss:
        model, objective, groups, teacher_flops = build(name, kind, args, device, latent)
        model.to(device).train()
        model.enable_gradient_checkpointing(args.checkpointing_now)
        ema = create_ema(model)
        if groups is None:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-4}]
        opt = make_optimizer(groups, argparse.Namespace(lr=1e-4, weight_decay=0.0))
        if args.compile_now:
            compile_blocks(model)
        step = TrainStep(model, objective, opt, ema, device=device, precision=precision, ema_decay=0.9999,
                         grad_clip=1.0, accum_steps=args.grad_accum_steps)  # fmt: skip
        x = torch.randn(args.batch_size, 4, latent, latent, device=device)
        y = torch.randint(0, 1000, (args.batch_size,), device=device)
        warmup = args.warmup_steps if args.warmup_steps is not None else (3 if args.compile_now else 1)
        for i in range(warmup):
            step(x, y, i)
        sync(device)
        times = []
        for i in range(args.timed_steps):
            start = time.perf_counter()
            step(x, y, warmup + i)
            sync(device)
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    mode = STEP_MODE[kind]
    flops = dit_step_flops(model, args.batch_size, mode, args.checkpointing_now, args.lora_rank) + teacher_flops
    row.update(
        params_m=model.num_params() / 1e6, step_s=seconds, steps_s=1 / seconds, img_s=args.batch_size / seconds,
        gflop_step=flops / 1e9, tflops=flops / seconds / 1e12,
    )  # fmt: skip
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        row["peak_mem_gb"] = (rss.peak - rss.start) / 2**30
    del model, objective, ema, opt, step
    return row


def main(args: argparse.Namespace) -> list[dict]:
    device, precision, peak_precision, peak = dit_bench_setup(args)
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 8)
    args.timed_steps = args.timed_steps or (10 if device.type == "cuda" else 2)
    print(f"{device} {precision}: measured {peak_precision} matmul rate {peak / 1e12:.3f} TFLOP/s; batch "
          f"{args.batch_size}, {args.image_size}px, {args.timed_steps} timed steps", flush=True)  # fmt: skip
    both = {"off": [False], "on": [True], "both": [False, True]}
    rows = []
    for name in args.models:
        for kind in args.kinds:
            for ckpt in both[args.checkpointing]:
                for comp in both[args.compile]:
                    args.checkpointing_now, args.compile_now = ckpt, comp
                    row = bench_row(name, kind, args, device, precision)
                    if "tflops" in row:
                        row["peak_share"] = row["tflops"] * 1e12 / peak
                    rows.append(row)
                    what = f"{row['step_s']:.3f} s/step" if "step_s" in row else f"skipped: {row['skipped']}"
                    print(f"  {name} {kind} ckpt={ckpt} compile={comp}: {what}", flush=True)
    columns = [
        ("model", "model", ""), ("kind", "step", ""), ("ckpt", "ckpt", ""), ("compile", "compile", ""),
        ("batch", "batch", "d"), ("params_m", "params (M)", ".0f"), ("steps_s", "steps/s", ".3f"),
        ("img_s", "img/s", ".2f"), ("gflop_step", "GFLOP/step", ".0f"), ("tflops", "TFLOP/s", ".3f"),
        ("peak_share", "share of matmul peak", ".0%"), ("peak_mem_gb", "peak mem (GB)", ".2f"),
        ("skipped", "note", ""),
    ]  # fmt: skip
    print_table(rows, columns)
    memory = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS above the pre-build RSS (psutil)"
    write_json(args.json_out, {"machine": machine(), "matmul_tflops": peak / 1e12, "matmul_precision": peak_precision,
                               "memory": memory, "args": vars(args), "rows": rows})  # fmt: skip
    return rows


if __name__ == "__main__":
    main(parse_args())
