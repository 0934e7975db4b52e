"""Sample a grid of images from a DiT (plain or pruned) and save it as a PNG.

python sample.py --model DiT-XL/2 --image-size 256   # DiT-XL-2-256x256.pt: pretrained_models/, else downloaded
python sample.py --model DiT-D14/2 --ckpt TinyDiT-D14-MaskedKD-500K.pt --vae ema
python sample.py --model DiT-S/2 --image-size 32 --vae none --num-classes 10 --random-init   # random weights, pixels

Sampling runs in fp32 with TF32 matmuls on CUDA, as DiT's scripts (--no-tf32, --precision bf16 to change it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffcompress.cli import ArgumentParser, non_negative_int, run
from diffcompress.distributed import setup_distributed
from diffcompress.sampling import add_sampling_args, apply_precision, load_model_and_codec, sample_latents, save_grid

DEFAULT_IMAGENET_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(p, cfg_scale=4.0)
    p.add_argument("--class-labels", default=None, help="comma-separated labels (default: 8 fixed classes)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="sample.png")
    return p.parse_args(argv)


def parse_labels(text: str | None, num_classes: int) -> list[int]:
    if text is None:
        if num_classes == 1000:
            return DEFAULT_IMAGENET_CLASSES
        return [i % num_classes for i in range(8)]
    try:
        labels = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--class-labels {text!r}: expected comma-separated integers") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if not labels or bad:
        raise ValueError(f"--class-labels {text!r}: labels must lie in 0..{num_classes - 1}")
    return labels


@torch.no_grad()
def main(args: argparse.Namespace) -> Path:
    info = setup_distributed(args.device)
    device, (precision, tf32) = info.device, apply_precision(args, info.device)
    model, codec, latent_size = load_model_and_codec(args, device)
    labels = parse_labels(args.class_labels, args.num_classes)
    n = len(labels)
    generator = torch.Generator(device).manual_seed(args.seed)
    z = torch.randn(n, codec.channels, latent_size, latent_size, generator=generator, device=device)
    start = time.perf_counter()
    samples = sample_latents(model, z, torch.tensor(labels, device=device), args, precision, generator)
    elapsed = time.perf_counter() - start
    images = codec.decode(samples)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, out, nrow=min(n, 4))
    how = f"{precision}{' with TF32 matmuls' if tf32 else ''}"
    print(f"sampled {n} images with {args.num_sampling_steps} {args.sampler} steps in {how} in {elapsed:.1f}s; "
          f"wrote {out}")  # fmt: skip
    return out


if __name__ == "__main__":
    run(lambda: main(parse_args()))
