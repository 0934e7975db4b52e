"""What sample.py and sample_ddp.py share: their flags, loading the model and codec, guided sampling."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusion import create_diffusion
from diffusion.dpm_solver import dpm_solver_sample_loop
from models_with_layer_pruning import DiT, DiT_models, create_model

from .checkpoint import load_dit_weights
from .cli import non_negative_float, positive_int, sampling_steps
from .distributed import autocast, resolve_precision, set_tf32
from .downloads import resolve_checkpoint
from .errors import UserError
from .vae import PixelCodec, VAECodec, load_vae


def add_sampling_args(p: argparse.ArgumentParser, cfg_scale: float) -> None:
    p.add_argument("--model", choices=list(DiT_models), default="DiT-XL/2")
    p.add_argument(
        "--depth", type=positive_int, default=None, help="override the model's depth (a model pruned from it)"
    )
    p.add_argument("--groups", default=None, help="custom N:M groups for a prunable model, e.g. '[[1,2],[2,4]]'")
    p.add_argument("--ckpt", default=None,
                   help="a checkpoint file (state dict, training checkpoint or safetensors), a released name "
                   "(DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt, TinyDiT-D14-MaskedKD-500K.pt: from pretrained_models/ "
                   "or downloaded there) or a run's checkpoint by its folder's prefix; default for DiT-XL/2: "
                   "DiT-XL-2-<image-size>.pt, as DiT's scripts")  # fmt: skip
    p.add_argument("--random-init", action="store_true", help="sample from randomly initialised weights (no --ckpt)")
    p.add_argument("--no-ema", action="store_true", help="use 'model' instead of 'ema' from a training checkpoint")
    p.add_argument("--vae", default="ema", help="ema | mse | a local diffusers VAE folder | none (pixel-space model)")
    p.add_argument("--image-size", type=positive_int, default=256)
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--cfg-scale", type=non_negative_float, default=cfg_scale)
    p.add_argument("--cfg-all-channels", action="store_true", help="guide every noise channel, not DiT's first 3")
    p.add_argument("--num-sampling-steps", type=sampling_steps, default=250)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm-solver"], default="ddpm",
                   help="ddpm (the paper's), ddim, or dpm-solver (DPM-Solver++ 2M: use 20-25 steps)")  # fmt: skip
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--precision", default="auto",
                   help="auto (fp32, as DiT's sampling scripts) | fp32 | bf16 | fp16 (CUDA) autocast")  # fmt: skip
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on CUDA for fp32 sampling, as DiT's scripts (--no-tf32: full fp32)")  # fmt: skip


def sampling_precision(precision: str | None, tf32: bool, device: torch.device) -> tuple[str, bool]:
    """(precision, tf32) that sampling runs with: ``auto`` is fp32 on every device, as DiT's sampling scripts (bf16
    only when asked: it moves 50K-sample FIDs); TF32 exists only on CUDA, so it is off on CPU whatever asked."""
    chosen = "fp32" if precision in (None, "auto") else resolve_precision(precision, device)
    return chosen, bool(tf32) and device.type == "cuda"


def apply_precision(args: argparse.Namespace, device: torch.device) -> tuple[str, bool]:
    """Choose with ``sampling_precision`` and set the CUDA TF32 switches to match (setup_distributed turns them on)."""
    precision, tf32 = sampling_precision(args.precision, args.tf32, device)
    set_tf32(device, tf32)
    return precision, tf32


def default_checkpoint(args: argparse.Namespace) -> str | None:
    """``--ckpt`` when given; for DiT-XL/2 at 256 or 512 DiT's released ``DiT-XL-2-<size>.pt``; ``None`` with
    ``--random-init``; else one line asking for either."""
    if args.random_init:
        if args.ckpt:
            raise UserError("--random-init and --ckpt exclude each other: pass one of them")
        return None
    if args.ckpt:
        return args.ckpt
    dit_xl = args.model == "DiT-XL/2" and not args.depth and not args.groups and args.num_classes == 1000
    if dit_xl and args.image_size in (256, 512):
        return f"DiT-XL-2-{args.image_size}x{args.image_size}.pt"
    raise UserError(f"--ckpt is required for --model {args.model} at --image-size {args.image_size} (a checkpoint "
                    "file, a released name or a run's checkpoint); --random-init samples random weights")  # fmt: skip


def load_model_and_codec(args: argparse.Namespace, device: torch.device) -> tuple[DiT, PixelCodec | VAECodec, int]:
    """The DiT in eval mode on ``device`` (weights from --ckpt, resolved in place: a released name or a run folder's
    prefix becomes the file's path), the image codec, and the latent size."""
    args.ckpt = resolve_checkpoint(default_checkpoint(args))  # before the VAE: a missing checkpoint fails fast
    codec = load_vae(args.vae, device)
    if args.image_size % codec.downsample:
        raise UserError(f"--image-size {args.image_size} must be divisible by the VAE's factor {codec.downsample}")
    latent_size = args.image_size // codec.downsample
    model = create_model(
        args.model, groups=args.groups, input_size=latent_size, num_classes=args.num_classes,
        in_channels=codec.channels, **({"depth": args.depth} if args.depth else {}),
    ).to(device)  # fmt: skip
    if args.ckpt:
        load_dit_weights(model, args.ckpt, use_ema=not args.no_ema, flag="--ckpt")
    else:
        print("note: --random-init: sampling from randomly initialised weights")
    return model.eval(), codec, latent_size


@torch.no_grad()
def sample_latents(
    model: DiT, z: torch.Tensor, y: torch.Tensor, args: argparse.Namespace, precision: str,
    generator: torch.Generator | None = None, progress: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Denoise ``z`` for labels ``y`` with --sampler, --num-sampling-steps and (if > 1) --cfg-scale."""
    device, n = z.device, len(z)
    if args.cfg_scale > 1.0:
        z, y = torch.cat([z, z]), torch.cat([y, torch.full_like(y, args.num_classes)])
        channels = None if args.cfg_all_channels else 3
        kwargs, forward = dict(y=y, cfg_scale=args.cfg_scale, cfg_channels=channels), model.forward_with_cfg
    else:
        kwargs, forward = dict(y=y), model.forward

    def model_fn(x, t, **kw):
        with autocast(device, precision):
            return forward(x, t, **kw).float()

    if args.sampler == "dpm-solver":
        out = dpm_solver_sample_loop(model_fn, create_diffusion(""), z, args.num_sampling_steps, kwargs, progress)
    else:
        diffusion = create_diffusion(str(args.num_sampling_steps))
        loop = diffusion.p_sample_loop if args.sampler == "ddpm" else diffusion.ddim_sample_loop
        out = loop(model_fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs, progress=progress, device=device,
                   generator=generator)  # fmt: skip
    return out[:n]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], [N, 3, H, W] -> uint8 [N, H, W, 3] (DiT's rounding: clamp(127.5 x + 128))."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, padding: int = 2) -> None:
    """Images in [-1, 1], [N, 3, H, W] -> one PNG, ``nrow`` per row on a black ``padding``: the picture of DiT's
    ``torchvision.utils.save_image(..., normalize=True, value_range=(-1, 1))`` without importing torchvision (about
    two seconds at every start). A single image is saved without the border, as torchvision does."""
    x = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu()
    n, c, h, w = x.shape
    if n == 1:
        grid = x[0]
    else:
        rows, cols = -(-n // nrow), min(nrow, n)
        grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
        for i, image in enumerate(x):
            top, left = (i // cols) * (h + padding) + padding, (i % cols) * (w + padding) + padding
            grid[:, top : top + h, left : left + w] = image
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
    Image.fromarray(pixels.squeeze(-1) if c == 1 else pixels).save(path)
