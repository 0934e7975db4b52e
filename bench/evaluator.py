"""Evaluator throughput: images/s through the Inception backend of evaluator.py, at a few batch sizes.

python bench/evaluator.py                                   # torch backend, random weights, 256 px uint8
python bench/evaluator.py --batch-sizes 64 256 --inception-weights pt_inception-2015-12-05-6726825d.pth
python bench/evaluator.py --backends torch tf --inception-graph classify_image_graph_def.pb   # needs tensorflow

The torch rows time ``TorchInception.activations`` (resize to 299, the Inception graph, both feature taps, the
copy back to numpy); without --inception-weights the same network runs with random weights (speed does not
depend on them). FLOPs per image are counted once by torch's FlopCounterMode on the meta device and shown as a
share of the fp32 matmul rate measured in the same run (the evaluator keeps fp32: its features feed a
covariance). The tf backend runs only when tensorflow is installed and the graph file is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, matmul_rate, print_table, sync, write_json  # noqa: E402
from diffcompress.inception import FIDInception, TorchInception  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["torch"], choices=["torch", "tf"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 16 64 256 GPU, 4 16 CPU")
    p.add_argument("--image-size", type=int, default=256, help="input pixels (resized to 299 inside)")
    p.add_argument("--repeats", type=int, default=None, help="timed batches per size (default: 5 GPU, 2 CPU)")
    p.add_argument("--inception-weights", default=None, help="real weights for the torch backend (optional)")
    p.add_argument("--inception-graph", default=None, help="classify_image_graph_def.pb (tf backend)")
    p.add_argument("--device", default=None)
    p.add_argument(
        "--matmul-size", type=int, default=None, help="n of the n^3 peak matmul (default 8192 GPU, 2048 CPU)"
    )
    p.add_argument("--json-out", default="results/bench/evaluator.json")
    return p.parse_args(argv)


def inception_flops(size: int) -> float:
    """FLOPs of one image through the graph (resize, convolutions, the logits), by FlopCounterMode on meta."""
    with torch.device("meta"):
        net = FIDInception()
        images = torch.zeros(1, size, size, 3)
        with FlopCounterMode(display=False) as counter:
            net(images)
    return float(counter.get_total_flops())


class RandomTorchInception(TorchInception):
    """TorchInception's code path with random weights (no weight file needed to time it)."""

    def __init__(self, device: torch.device):
        self.device, self.model, self._identity = device, FIDInception(), "torch:random"
        self.model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)


def load(backend: str, args: argparse.Namespace, device: torch.device):
    if backend == "torch":
        if args.inception_weights:
            return TorchInception(args.inception_weights, device)
        return RandomTorchInception(device)
    if not args.inception_graph:
        raise RuntimeError("tf backend: give --inception-graph classify_image_graph_def.pb")
    from diffcompress.inception_tf import TFInception

    return TFInception(args.inception_graph)


def main(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # as evaluator.py: exact fp32 convolutions
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    sizes = args.batch_sizes or ([16, 64, 256] if device.type == "cuda" else [4, 16])
    repeats = args.repeats or (5 if device.type == "cuda" else 2)
    peak = matmul_rate(device, "fp32", args.matmul_size)
    per_image = inception_flops(args.image_size)
    print(f"{device}: measured fp32 matmul rate {peak / 1e12:.3f} TFLOP/s; {per_image / 1e9:.1f} GFLOP per "
          f"{args.image_size}px image", flush=True)  # fmt: skip
    rows = []
    rng = np.random.default_rng(0)
    for backend in args.backends:
        try:
            net = load(backend, args, device)
        except Exception as e:  # e.g. tensorflow missing: a row that says why
            rows.append({"backend": backend, "note": f"skipped: {e}"})
            print(f"  {backend}: skipped ({e})", flush=True)
            continue
        for batch in sizes:
            images = rng.integers(0, 256, (batch, args.image_size, args.image_size, 3), dtype=np.uint8)
            net.activations(images)  # warm-up: allocator, kernel choice
            sync(device)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                net.activations(images)
                sync(device)
                times.append(time.perf_counter() - start)
            seconds = sorted(times)[len(times) // 2]
            row = {"backend": backend, "batch": batch, "img_s": batch / seconds,
                   "tflops": per_image * batch / seconds / 1e12}  # fmt: skip
            row["peak_share"] = row["tflops"] * 1e12 / peak
            rows.append(row)
            print(f"  {backend} batch {batch}: {row['img_s']:.2f} img/s", flush=True)
    columns = [
        ("backend", "backend", ""), ("batch", "batch", "d"), ("img_s", "img/s", ".2f"), ("tflops", "TFLOP/s", ".3f"),
        ("peak_share", "share of fp32 matmul peak", ".0%"), ("note", "note", ""),
    ]  # fmt: skip
    print_table(rows, columns)
    write_json(args.json_out, {"machine": machine(), "matmul_tflops": peak / 1e12, "gflop_per_image": per_image / 1e9,
                               "args": vars(args), "rows": rows})  # fmt: skip
    return rows


if __name__ == "__main__":
    main(parse_args())
