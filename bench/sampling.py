"""Sampling throughput of DiT-XL/2 and its depth-pruned sizes (random weights: speed does not depend on them).

python bench/sampling.py                                   # XL/2, D19, D14, D7 at 256px, DDPM, CFG 1.5
python bench/sampling.py --samplers ddpm ddim dpm-solver --precision bf16 --batch-size 32   # a GPU

With --rounds R every model is timed R times in turn and its median kept. Every sampler step costs one guided
forward pass of the whole batch (2B images with CFG), whatever the step count,
so the loop runs --timed-steps real steps through sample.py's code and reports iterations/s; images/s of a full
run is batch / (its step count / it/s). Achieved FLOP/s are the analytic forward FLOPs over the measured time,
shown as a share of the matmul rate measured in the same run at the same precision.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import dit_bench_setup, dit_forward_flops, machine, print_table, sync, write_json  # noqa: E402
from diffcompress.sampling import sample_latents  # noqa: E402
from models_with_layer_pruning import create_model  # noqa: E402

FULL_STEPS = {"ddpm": 250, "ddim": 250, "dpm-solver": 25}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["DiT-XL/2", "DiT-D19/2", "DiT-D14/2", "DiT-D7/2"])
    p.add_argument("--samplers", nargs="+", default=["ddpm"], choices=list(FULL_STEPS))
    p.add_argument("--image-size", type=int, default=256, help="pixels; latents are 8x smaller (4 channels)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 32 on GPU, 2 on CPU)")
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--timed-steps", type=int, default=None, help="sampler steps timed (default: 20 GPU, 3 CPU)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
    p.add_argument("--rounds", type=int, default=1, help="time every model this many times, in turn (ABAB: for "
                   "noisy shared machines), and keep each one's median")  # fmt: skip
    p.add_argument("--device", default=None)
    p.add_argument(
        "--matmul-size", type=int, default=None, help="n of the n^3 peak matmul (default 8192 GPU, 2048 CPU)"
    )
    p.add_argument("--json-out", default="results/bench/sampling.json")
    return p.parse_args(argv)


def bench_model(name: str, sampler: str, args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    latent = args.image_size // 8
    torch.manual_seed(0)
    model = create_model(name, input_size=latent, num_classes=1000).to(device).eval()
    run = argparse.Namespace(
        cfg_scale=args.cfg_scale, num_classes=1000, cfg_all_channels=False, sampler=sampler,
        num_sampling_steps=args.timed_steps,
    )  # fmt: skip
    z = torch.randn(args.batch_size, 4, latent, latent, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    if args.timed_steps < 2:  # a respaced schedule of one step has no posterior variance
        raise ValueError("--timed-steps must be at least 2")
    warm = argparse.Namespace(**{**vars(run), "num_sampling_steps": 2})
    sample_latents(model, z, y, warm, precision, progress=False)  # kernels, autotuning, allocator
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sample_latents(model, z, y, run, precision, progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    it_s = args.timed_steps / seconds
    forwards = 2 * args.batch_size if args.cfg_scale > 1 else args.batch_size
    flops = dit_forward_flops(model, forwards) * it_s
    row = {
        "model": name, "sampler": sampler, "depth": len(model.blocks), "params_m": model.num_params() / 1e6,
        "it_s": it_s, "img_s": args.batch_size * it_s / FULL_STEPS[sampler], "full_steps": FULL_STEPS[sampler],
        "tflops": flops / 1e12,
    }  # fmt: skip
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model
    return row


def main(args: argparse.Namespace) -> list[dict]:
    device, precision, _, peak = dit_bench_setup(args)
    args.batch_size = args.batch_size or (32 if device.type == "cuda" else 2)
    args.timed_steps = args.timed_steps or (20 if device.type == "cuda" else 3)
    print(f"{device} {precision}: measured matmul rate {peak / 1e12:.2f} TFLOP/s; batch {args.batch_size}, "
          f"cfg {args.cfg_scale}, {args.image_size}px, {args.timed_steps} timed steps")  # fmt: skip
    rows = []
    for sampler in args.samplers:
        base = None
        runs = {name: [] for name in args.models}
        for _ in range(args.rounds):  # models in turn, so slow drifts of a shared machine hit all alike
            for name in args.models:
                runs[name].append(bench_model(name, sampler, args, device, precision))
        for name in args.models:
            row = sorted(runs[name], key=lambda r: r["it_s"])[len(runs[name]) // 2]
            row["rounds"] = [r["it_s"] for r in runs[name]]
            base = base or row["it_s"]
            row["speedup"] = row["it_s"] / base
            row["peak_share"] = row["tflops"] * 1e12 / peak
            rows.append(row)
            print(f"  {name} {sampler}: {row['it_s']:.3f} it/s", flush=True)
    columns = [
        ("model", "model", ""), ("depth", "depth", "d"), ("params_m", "params (M)", ".0f"), ("sampler", "sampler", ""),
        ("it_s", "it/s", ".3f"), ("img_s", "img/s (full run)", ".4f"), ("full_steps", "steps", "d"),
        ("speedup", f"speedup vs {args.models[0]}", ".2f"), ("tflops", "TFLOP/s", ".2f"),
        ("peak_share", "share of matmul peak", ".0%"), ("peak_mem_gb", "peak mem (GB)", ".1f"),
    ]  # fmt: skip
    print_table(rows, columns)
    write_json(args.json_out, {"machine": machine(), "matmul_tflops": peak / 1e12, "args": vars(args), "rows": rows})
    return rows


if __name__ == "__main__":
    main(parse_args())
