"""Interleaved A/B timings of the hot-path choices, for noisy shared machines: every round runs each variant once
(ABAB...), the medians are compared, and the matmul rates are measured in the same process.

python bench/ab.py                                      # every experiment but compile, default sizes
python bench/ab.py --experiments precision --rounds 5   # one experiment
python bench/ab.py --batch-size 64 --image-size 256     # DiT-S/2 at 256 px (32x32 latents)

Experiments (DiT-S/2 unless noted; training steps are diffcompress.trainer.TrainStep, as the scripts run them):
  adamw      AdamW step over DiT-S/2's parameters: for-each (torch's CPU default) vs fused
  ema        EMA update: a loop over parameters vs one _foreach_lerp_ (diffcompress.ema)
  precision  training step fp32 vs bf16 autocast, for DiT-S/2 and the width-128 DiT-Digits/2 (8 px, batch 256)
  attention  one block's attention: explicit softmax(QK^T)V vs F.scaled_dot_product_attention
  sampling   guided forward pass (2B): torch.no_grad vs torch.inference_mode
  pruning    train.py's step vs prune_by_learning's (frozen gates, LoRA) on the same model
  compile    training step eager vs torch.compile'd blocks (compiles first: slow on a CPU)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dit_step_flops, machine, matmul_rate, sync, write_json  # noqa: E402
from bench.training import STEP_MODE, build  # noqa: E402
from diffcompress.ema import create_ema  # noqa: E402
from diffcompress.trainer import TrainStep, compile_blocks, diffusion_objective, make_optimizer  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models_with_layer_pruning import create_model  # noqa: E402

EXPERIMENTS = ("adamw", "ema", "precision", "attention", "sampling", "pruning", "compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", nargs="+", default=[e for e in EXPERIMENTS if e != "compile"], choices=EXPERIMENTS,
                   help="default: all but compile (minutes of C++ builds on a CPU)")  # fmt: skip
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--image-size", type=int, default=256, help="pixels; latents are 8x smaller")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--digits-batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="ABAB rounds (each variant runs once per round)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--matmul-size", type=int, default=None, help="n of the n^3 peak matmul (default 8192 GPU, 2048 CPU)"
    )
    p.add_argument("--json-out", default="results/bench/ab.json")
    return p.parse_args(argv)


def interleave(variants: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each variant; one warm-up each, then ``rounds`` rounds of A, B, ... in turn."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def train_step(name: str, latent: int, channels: int, classes: int, batch: int, precision: str, device, compiled=False):
    torch.manual_seed(0)
    model = create_model(name, input_size=latent, in_channels=channels, num_classes=classes).to(device).train()
    opt = make_optimizer([{"params": list(model.parameters())}], argparse.Namespace(lr=1e-4, weight_decay=0.0))
    if compiled:
        compile_blocks(model)
    step = TrainStep(model, diffusion_objective(create_diffusion("")), opt, create_ema(model), device=device,
                     precision=precision, ema_decay=0.9999, grad_clip=1.0)  # fmt: skip
    x = torch.randn(batch, channels, latent, latent, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    return model, (lambda: step(x, y, 0))


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    latent = args.image_size // 8
    rates = {p: matmul_rate(device, p, args.matmul_size) for p in ("fp32", "bf16")}
    print(f"{device}: matmul rate fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s; "
          f"{args.model} {args.image_size}px batch {args.batch_size}; {args.rounds} rounds", flush=True)  # fmt: skip
    results: dict[str, dict] = {}

    def report(name: str, medians: dict[str, float], flops: dict[str, float] | None = None, precisions=None):
        (a, ta), (b, tb) = list(medians.items())[:2]
        entry = {"seconds": medians, "speedup_b_over_a": ta / tb}
        if flops:
            entry["gflops"] = {k: flops[k] / medians[k] / 1e9 for k in medians}
            entry["share"] = {k: flops[k] / medians[k] / rates[precisions[k]] for k in medians}
        results[name] = entry
        extra = "; ".join(f"{k} {v:.0%} of {precisions[k]} matmul" for k, v in entry.get("share", {}).items())
        times = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in medians.items())
        print(f"  {name}: {times} -> {b} {ta / tb:.2f}x {a}'s speed; {extra}", flush=True)

    if "adamw" in args.experiments:
        torch.manual_seed(0)
        model = create_model(args.model, input_size=latent).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opts = {k: torch.optim.AdamW(model.parameters(), lr=1e-6, **{k: True}) for k in ("foreach", "fused")}
        report("adamw", interleave({k: o.step for k, o in opts.items()}, args.rounds, device))
    if "ema" in args.experiments:
        from diffcompress.ema import update_ema

        model = create_model(args.model, input_size=latent).to(device)
        ema = create_ema(model)

        @torch.no_grad()
        def loop():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1e-4)

        report(
            "ema", interleave({"loop": loop, "foreach": lambda: update_ema(ema, model, 0.9999)}, args.rounds, device)
        )
    if "precision" in args.experiments:
        for name, lat, ch, cls, batch in ((args.model, latent, 4, 1000, args.batch_size),
                                          ("DiT-Digits/2", 8, 3, 10, args.digits_batch_size)):  # fmt: skip
            fns, flops = {}, {}
            for prec in ("fp32", "bf16"):
                model, fns[prec] = train_step(name, lat, ch, cls, batch, prec, device)
                flops[prec] = dit_step_flops(model, batch)
            report(
                f"precision {name} b{batch}",
                interleave(fns, args.rounds, device),
                flops,
                {"fp32": "fp32", "bf16": "bf16"},
            )
    if "attention" in args.experiments:
        model = create_model(args.model, input_size=latent)
        heads, width, tokens = model.num_heads, model.pos_embed.shape[-1], model.x_embedder.num_patches
        q, k, v = (torch.randn(args.batch_size, heads, tokens, width // heads, device=device) for _ in range(3))

        def explicit():
            return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(-1) @ v

        variants = {"explicit": explicit, "sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
        with torch.no_grad():
            report("attention", interleave(variants, args.rounds, device))
    if "sampling" in args.experiments:
        torch.manual_seed(0)
        model = create_model(args.model, input_size=latent).to(device).eval()
        z = torch.randn(2 * args.batch_size, 4, latent, latent, device=device)
        t = torch.full((2 * args.batch_size,), 500, device=device)
        y = torch.randint(0, 1000, (2 * args.batch_size,), device=device)

        def under(ctx):
            def fn():
                with ctx():
                    return model.forward_with_cfg(z, t, y, 1.5)

            return fn

        report("sampling", interleave({"no_grad": under(torch.no_grad), "inference_mode": under(torch.inference_mode)},
                                      args.rounds, device))  # fmt: skip
    if "pruning" in args.experiments:
        fns, flops, kinds = {}, {}, ("train", "prune-frozen", "prune-lora")
        ns = argparse.Namespace(batch_size=args.batch_size, lora_rank=8, compile_now=False)
        for kind in kinds:
            torch.manual_seed(0)
            model, objective, groups, _ = build(args.model, kind, ns, device, latent)
            model.to(device).train()
            groups = groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
            opt = make_optimizer(groups, argparse.Namespace(lr=1e-4, weight_decay=0.0))
            step = TrainStep(model, objective, opt, create_ema(model), device=device, precision="fp32",
                             ema_decay=0.9999, grad_clip=1.0)  # fmt: skip
            x = torch.randn(args.batch_size, 4, latent, latent, device=device)
            y = torch.randint(0, 1000, (args.batch_size,), device=device)
            fns[kind] = lambda step=step, x=x, y=y: step(x, y, 0)
            flops[kind] = dit_step_flops(model, args.batch_size, STEP_MODE[kind], lora_rank=8)
        report("pruning", interleave(fns, args.rounds, device), flops, dict.fromkeys(kinds, "fp32"))
    if "compile" in args.experiments:
        fns, flops = {}, {}
        for compiled in (False, True):
            key = "compiled" if compiled else "eager"
            start = time.perf_counter()
            model, fns[key] = train_step(args.model, latent, 4, 1000, args.batch_size, "fp32", device, compiled)
            fns[key]()  # compiles here
            print(f"  {key}: first step {time.perf_counter() - start:.1f} s", flush=True)
            flops[key] = dit_step_flops(model, args.batch_size)
        report("compile", interleave(fns, args.rounds, device), flops, {"eager": "fp32", "compiled": "fp32"})
    payload = {"machine": machine(), "matmul_gflops": {k: v / 1e9 for k, v in rates.items()}, "args": vars(args),
               "results": results}  # fmt: skip
    write_json(args.json_out, payload)
    return payload


if __name__ == "__main__":
    run(parse_args())
