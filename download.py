"""Fetch released weights once, into the cache every script looks in, and print where they are (DiT's download.py).

python download.py --model DiT-XL-2-256x256.pt          # -> pretrained_models/DiT-XL-2-256x256.pt
python download.py --model TinyDiT-D14-MaskedKD-500K.pt --vae ema
python download.py --all                                 # every released checkpoint

Checkpoints go to ``$DIFFCOMPRESS_PRETRAINED`` (default ``pretrained_models/``), through a temporary file renamed once
complete; VAEs to ``<that folder>/sd-vae-ft-ema`` (or ``-mse``), where ``--vae ema`` finds them without network.
Files already there are not fetched again. Offline, each missing file is one line naming its URL and destination.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffcompress.cli import ArgumentParser, run
from diffcompress.downloads import RELEASED, fetch_released, offline, pretrained_dir
from diffcompress.errors import UserError
from diffcompress.vae import HUB_VAES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], choices=list(RELEASED), help="a released checkpoint")
    p.add_argument("--all", action="store_true", help="every released checkpoint")
    p.add_argument("--vae", action="append", default=[], choices=list(HUB_VAES), help="a Stable Diffusion VAE")
    return p.parse_args(argv)


def fetch_vae(name: str) -> Path:
    """The diffusers folder of ``--vae name`` (config + safetensors weights) in ``pretrained_dir()``."""
    repo = HUB_VAES[name]
    target = pretrained_dir() / repo.split("/")[-1]
    if (target / "config.json").is_file():
        return target
    url = f"https://huggingface.co/{repo}"
    if offline():
        raise UserError(f"--vae {name}: the network is off; download {url} elsewhere and put it at {target}")
    from huggingface_hub import snapshot_download

    try:  # only what AutoencoderKL reads: the repo also holds a 335 MB original .ckpt
        snapshot_download(repo, local_dir=target, allow_patterns=["config.json", "*.safetensors"])
    except Exception as e:  # offline, proxy, or a moved repo: one line
        raise UserError(f"--vae {name}: could not download {url} ({type(e).__name__}); download it elsewhere "
                        f"(hf download {repo} --local-dir {target}) and put it at {target}") from None  # fmt: skip
    return target


def main(args: argparse.Namespace) -> list[Path]:
    names = list(RELEASED) if args.all else list(dict.fromkeys(args.model))
    if not names and not args.vae:
        raise UserError(f"nothing to fetch: pass --model ({', '.join(RELEASED)}), --all or --vae (ema, mse)")
    paths = [fetch_released(name) for name in names] + [fetch_vae(v) for v in dict.fromkeys(args.vae)]
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    run(lambda: main(parse_args()))
