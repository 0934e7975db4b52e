"""Sample a grid of images from a DiT (plain or pruned) and save it as a PNG.

python sample.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --vae ema --image-size 256
python sample.py --model DiT-D14/2 --ckpt TinyDiT-D14-MaskedKD-500K.pt --vae ema
python sample.py --model DiT-S/2 --image-size 32 --vae none --num-classes 10   # random weights, pixels
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from diffcompress.checkpoint import load_dit_weights
from diffcompress.cli import run
from diffcompress.distributed import autocast, resolve_precision, setup_distributed
from diffcompress.vae import load_vae
from diffusion import create_diffusion
from diffusion.dpm_solver import dpm_solver_sample_loop
from models_with_layer_pruning import DiT_models, create_model

DEFAULT_IMAGENET_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(DiT_models), default="DiT-XL/2")
    p.add_argument("--depth", type=int, default=None, help="override the model's depth (a model pruned from it)")
    p.add_argument("--groups", default=None, help="custom N:M groups for a prunable model, e.g. '[[1,2],[2,4]]'")
    p.add_argument("--ckpt", default=None, help="checkpoint (state dict, training checkpoint or safetensors)")
    p.add_argument("--no-ema", action="store_true", help="use 'model' instead of 'ema' from a training checkpoint")
    p.add_argument("--vae", default="ema", help="ema | mse | a local diffusers VAE folder | none (pixel-space model)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--class-labels", default=None, help="comma-separated labels (default: 8 fixed classes)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--cfg-all-channels", action="store_true", help="guide every noise channel, not DiT's first 3")
    p.add_argument("--num-sampling-steps", type=int, default=250)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm-solver"], default="ddpm",
                   help="ddpm (the paper's), ddim, or dpm-solver (DPM-Solver++ 2M: use 20-25 steps)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16")
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
        raise SystemExit(f"--class-labels {text!r}: expected comma-separated integers") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if not labels or bad:
        raise SystemExit(f"--class-labels {text!r}: labels must lie in 0..{num_classes - 1}")
    return labels


def main(args: argparse.Namespace) -> Path:
    torch.set_grad_enabled(False)
    info = setup_distributed(args.device)
    device, precision = info.device, resolve_precision(args.precision, info.device)
    codec = load_vae(args.vae, device)
    if args.image_size % codec.downsample:
        raise SystemExit(f"--image-size {args.image_size} must be divisible by the VAE's factor {codec.downsample}")
    latent_size = args.image_size // codec.downsample
    depth = {"depth": args.depth} if args.depth else {}
    model = create_model(
        args.model, groups=args.groups, input_size=latent_size, num_classes=args.num_classes,
        in_channels=codec.channels, **depth,
    ).to(device)  # fmt: skip
    if args.ckpt:
        load_dit_weights(model, args.ckpt, use_ema=not args.no_ema)
    else:
        print("warning: no --ckpt given, sampling from randomly initialised weights")
    model.eval()

    labels = parse_labels(args.class_labels, args.num_classes)
    n = len(labels)
    generator = torch.Generator(device).manual_seed(args.seed)
    z = torch.randn(n, codec.channels, latent_size, latent_size, generator=generator, device=device)
    y = torch.tensor(labels, device=device)
    if args.cfg_scale > 1.0:
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, args.num_classes)])
        channels = None if args.cfg_all_channels else 3
        kwargs = dict(y=y, cfg_scale=args.cfg_scale, cfg_channels=channels)
        forward = model.forward_with_cfg
    else:
        kwargs, forward = dict(y=y), model.forward

    def model_fn(x, t, **kw):
        with autocast(device, precision):
            return forward(x, t, **kw).float()

    start = time.perf_counter()
    if args.sampler == "dpm-solver":
        samples = dpm_solver_sample_loop(
            model_fn, create_diffusion(""), z, args.num_sampling_steps, model_kwargs=kwargs, progress=True
        )
    else:
        diffusion = create_diffusion(str(args.num_sampling_steps))
        loop = diffusion.p_sample_loop if args.sampler == "ddpm" else diffusion.ddim_sample_loop
        samples = loop(
            model_fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, progress=True, device=device,
            generator=generator,
        )  # fmt: skip
    elapsed = time.perf_counter() - start
    samples = samples[:n]
    images = codec.decode(samples)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=min(n, 4), normalize=True, value_range=(-1, 1))
    print(f"sampled {n} images with {args.num_sampling_steps} {args.sampler} steps in {elapsed:.1f}s; wrote {out}")
    return out


if __name__ == "__main__":
    run(lambda: main(parse_args()))
