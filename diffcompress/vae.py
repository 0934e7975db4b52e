"""Image <-> model-space codecs: the Stable Diffusion VAE (latents x 0.18215) or pixels (``--vae none``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .downloads import offline, pretrained_dir
from .errors import UserError

LATENT_SCALE = 0.18215
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class PixelCodec:
    """Identity codec for models that work on pixels in [-1, 1] (small data, CPU demos)."""

    channels = 3
    downsample = 1
    name = "none"

    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


class VAECodec:
    """A diffusers AutoencoderKL: images in [-1, 1] -> latents x 0.18215, and back."""

    def __init__(self, vae: torch.nn.Module, name: str):
        self.vae = vae.eval().requires_grad_(False)
        self.channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for the SD VAE
        self.name = name

    @torch.no_grad()
    def encode(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """A sample of the latent distribution, mean + std * noise (``noise`` default: fresh N(0, 1))."""
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        if noise is None:
            noise = torch.randn_like(dist.mean)
        return (dist.mean + dist.std * noise.to(dist.mean)).float() * LATENT_SCALE

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((latents / LATENT_SCALE).to(self.vae.dtype)).sample.float()


def load_vae(spec: str, device: torch.device | str = "cpu") -> PixelCodec | VAECodec:
    """``none`` -> pixels; a local diffusers VAE folder; ``ema``/``mse`` or a hub id: a copy in
    ``pretrained_dir()/<name>``, else the Hugging Face cache, else a download (online only), else one line."""
    if spec == "none":
        return PixelCodec()
    from diffusers import AutoencoderKL

    local = Path(spec)
    if local.exists():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(
                f"--vae {spec}: the folder has no config.json (expected a diffusers AutoencoderKL folder)"
            )
        return VAECodec(AutoencoderKL.from_pretrained(local).to(device), str(local))
    repo = HUB_VAES.get(spec, spec)
    copy = pretrained_dir() / repo.split("/")[-1]  # where download.py --vae and the error below put it
    if (copy / "config.json").is_file():
        return VAECodec(AutoencoderKL.from_pretrained(copy).to(device), str(copy))
    try:  # the cache first, without a request: offline machines with a cached VAE need no network
        with warnings.catch_warnings():  # diffusers passes hub arguments that huggingface_hub deprecated
            warnings.simplefilter("ignore")
            vae = AutoencoderKL.from_pretrained(repo, local_files_only=True)
    except Exception:
        vae = None
    if vae is None:
        why = "the network is off"
        if not offline():
            try:
                vae = AutoencoderKL.from_pretrained(repo)
            except Exception as e:  # offline, unknown id, or a partial download: one clear line
                why = f"the download failed ({type(e).__name__})"
        if vae is None:
            raise UserError(
                f"--vae {spec}: {repo} is neither in {copy} nor in the Hugging Face cache, and {why}. Download "
                f"https://huggingface.co/{repo} on a machine with network (python download.py --vae {spec}, or "
                f"hf download {repo} --local-dir {copy}) and put it at {copy}, or pass --vae PATH (or none)"
            )
    return VAECodec(vae.to(device), repo)
