"""Image <-> model-space codecs: the Stable Diffusion VAE (latents x 0.18215) or pixels (``--vae none``)."""

from __future__ import annotations

from pathlib import Path

import torch

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
    """``none`` -> pixels; a local diffusers VAE folder; ``ema``/``mse`` or a hub id (network only then)."""
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
    try:
        vae = AutoencoderKL.from_pretrained(repo)
    except Exception as e:  # offline, unknown id, or a partial download: one clear line
        raise UserError(
            f"--vae {spec}: could not load {repo!r} from the hub ({type(e).__name__}). Without network, download it "
            f"elsewhere (hf download {repo} --local-dir vae/) and pass --vae vae/, or use --vae none"
        ) from None
    return VAECodec(vae.to(device), repo)
