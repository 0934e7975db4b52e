"""Image <-> model-space codecs: the Stable Diffusion VAE (latents x 0.18215) or pixels (``--vae none``)."""

from __future__ import annotations

import json
import os
import re
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


def looks_like_path(spec: str) -> bool:
    """A ``--vae`` value meant as a local folder, not a hub id (``org/name``): it starts with ``.``, ``~`` or a
    separator, ends with one, or has more than one part."""
    seps = "/" + (os.sep if os.sep != "/" else "") + (os.altsep or "")
    parts = re.split(f"[{re.escape(seps)}]", spec)
    return spec.startswith((".", "~", *seps)) or spec.endswith(tuple(seps)) or len(parts) > 2


def _load_local(autoencoder, folder: Path, spec: str) -> torch.nn.Module:
    """A diffusers AutoencoderKL from a local folder, its weights checked (finite floats); one line when the folder
    is not one."""
    from .checkpoint import check_weights

    if not folder.is_dir():
        raise UserError(f"--vae {spec}: is a file, expected a diffusers AutoencoderKL folder (with config.json)")
    if not (folder / "config.json").is_file():
        raise UserError(f"--vae {spec}: the folder has no config.json (expected a diffusers AutoencoderKL folder)")
    try:
        json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--vae {spec}: {folder / 'config.json'} is not valid JSON ({e})") from None
    weights = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    if not any((folder / name).is_file() for name in weights):
        raise UserError(f"--vae {spec}: the folder has no {weights[0]} (nor .bin): the VAE's weights are missing")
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its logs about a broken folder: said in one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vae = autoencoder.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a broken folder: the folder's fault
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
        raise UserError(f"--vae {spec}: {folder} is not a loadable diffusers AutoencoderKL folder ({reason})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    check_weights(vae.state_dict(), f"--vae {spec}")
    return vae


def load_vae(spec: str, device: torch.device | str = "cpu") -> PixelCodec | VAECodec:
    """``none`` -> pixels; a local diffusers VAE folder; ``ema``/``mse`` or a hub id: a copy in
    ``pretrained_dir()/<name>``, else the Hugging Face cache, else a download (online only), else one line."""
    if spec == "none":
        return PixelCodec()
    local = Path(spec).expanduser()
    if not local.exists() and looks_like_path(spec):
        raise UserError(
            f"--vae {spec}: no such folder (expected a local diffusers AutoencoderKL folder with config.json; or ema, "
            f"mse, a Hugging Face id such as stabilityai/sd-vae-ft-ema, or none)"
        )
    from diffusers import AutoencoderKL

    if local.exists():
        return VAECodec(_load_local(AutoencoderKL, local, spec).to(device), str(local))
    repo = HUB_VAES.get(spec, spec)
    copy = pretrained_dir() / repo.split("/")[-1]  # where download.py --vae and the error below put it
    if (copy / "config.json").is_file():
        return VAECodec(_load_local(AutoencoderKL, copy, spec).to(device), str(copy))
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
            where = f"a local folder {spec}, " if spec == repo and "/" in spec else ""
            raise UserError(
                f"--vae {spec}: {repo} is neither {where}in {copy} nor in the Hugging Face cache, and {why}. Download "
                f"https://huggingface.co/{repo} on a machine with network (python download.py --vae {spec}, or "
                f"hf download {repo} --local-dir {copy}) and put it at {copy}, or pass --vae PATH (or none)"
            )
    return VAECodec(vae.to(device), repo)
