"""Encode an ImageNet-style folder into latents for training: one features file and one label file per image.

python extract_features.py --data-path /data/imagenet/train --features-path features --image-size 256 --vae ema
torchrun --nproc_per_node=8 extract_features.py --data-path /data/imagenet/train --features-path features

Each image is ADM center-cropped, then [x, flip(x)] are encoded: ``imagenet256_features/{i}.npy`` holds
float32 [2, C, H, W] and ``imagenet256_labels/{i}.npy`` holds [label], where ``i`` is the image's position in
the sorted folder listing (unreadable images leave a gap). Rank r of W encodes images r, r+W, r+2W, ... so
ranks never write the same file. Latents are posterior *samples* (as in DiT) whose noise is seeded from
(--global-seed, i): the same image gets the same latent on any number of ranks, in any batch, on any re-run.
Files are written under a temporary name and renamed, the label first; an image counts as done when both
files exist, and a re-run only encodes what is missing. ``--packed`` also writes ``features.npy`` + ``labels.npy``.

The authors' script parses train.py's flags too: ``--model`` is recorded in the manifest, ``--num-classes``
(when given) bounds the number of class folders, and ``--results-dir --epochs --global-batch-size --log-every
--ckpt-every`` are accepted with no effect on extraction (``--batch-size`` sets the images per process).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from diffcompress.checkpoint import write_json_atomic
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run
from diffcompress.data import (
    ON_EMPTY,
    CroppedImages,
    ImageFolderIndex,
    collate_images,
    pack_features,
    read_manifest,
)
from diffcompress.distributed import barrier, cleanup, setup_distributed
from diffcompress.progress import progress_bar
from diffcompress.vae import LATENT_SCALE, PixelCodec, VAECodec, load_vae

# Must agree between runs for a re-run to resume into the same folder.
CONFIG_KEYS = ("vae", "image_size", "global_seed", "num_images", "classes")
NO_EFFECT = ("--results-dir", "--epochs", "--global-batch-size", "--log-every", "--ckpt-every")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2", help="accepted for compatibility with the original; recorded only")
    p.add_argument("--data-path", required=True, help="ImageNet-style folder: <data-path>/<class>/<images>")
    p.add_argument("--features-path", default="features")
    p.add_argument(
        "--image-size", type=positive_int, default=256, help="a multiple of 8 with a VAE; any size with --vae none"
    )
    p.add_argument("--vae", default="ema", help="ema | mse | a local diffusers VAE folder | none (store pixels)")
    p.add_argument(
        "--global-seed", type=non_negative_int, default=0, help="seeds each image's latent sample (with its index)"
    )
    p.add_argument("--num-workers", type=non_negative_int, default=4)
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per process and step")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument(
        "--on-empty", choices=ON_EMPTY, default="report",
        help="a class folder without images: report it (its label stays reserved, 0 samples) or fail",
    )  # fmt: skip
    p.add_argument("--packed", action="store_true", help="also write the packed layout (features.npy + labels.npy)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="when given, the most class folders allowed")
    g = p.add_argument_group("the authors' training flags, accepted with no effect on extraction")
    for flag in NO_EFFECT:
        g.add_argument(flag, default=None)
    return p.parse_args(argv)


def image_seed(global_seed: int, index: int) -> int:
    """A well-mixed 64-bit seed for image ``index``: independent of rank, batch and re-runs."""
    return int(np.random.SeedSequence([global_seed % 2**64, index]).generate_state(1, dtype=np.uint64)[0])


@torch.no_grad()
def encode_views(
    codec: PixelCodec | VAECodec, images: torch.Tensor, indices: list[int], global_seed: int
) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 2, C, h, w]: view 0 the image, view 1 its horizontal flip.

    For a VAE: mean + std * noise, i.e. DiT's ``latent_dist.sample()``, but with the noise of image i drawn
    from its own generator (``image_seed``) so the result does not depend on how images are batched.
    """
    x = torch.cat([images, images.flip(dims=[3])])  # [view 0 of all B, view 1 of all B]
    noise = None
    if isinstance(codec, VAECodec):
        h = images.shape[-1] // codec.downsample
        gens = [torch.Generator().manual_seed(image_seed(global_seed, i)) for i in indices]
        noise = torch.stack([torch.randn((2, codec.channels, h, h), generator=g) for g in gens], dim=1)
        noise = noise.flatten(0, 1)  # [2, B, ...] -> view-major like x
    z = codec.encode(x, noise=noise).float()
    return z.unflatten(0, (2, len(images))).transpose(0, 1)


def save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)  # a crash leaves the old file or none, never half of one


def done_indices(feat_dir: Path, label_dir: Path) -> set[int]:
    """Indices whose label and features files both exist (one listing each: cheap on shared filesystems)."""

    def stems(d: Path) -> set[int]:
        return {int(n[:-4]) for n in os.listdir(d) if n.endswith(".npy") and n[:-4].isdigit()} if d.is_dir() else set()

    return stems(feat_dir) & stems(label_dir)


def check_manifest(out: Path, config: dict) -> None:
    """Refuse to resume into a folder made from other images, another VAE or another seed."""
    old = read_manifest(out)
    for key in CONFIG_KEYS if old else ():
        if key in old and old[key] != config[key]:
            what = "a different class list" if key == "classes" else f"{key}={old[key]!r}, not {config[key]!r}"
            raise ValueError(
                f"{out} already holds features made with {what}: pass another --features-path (or delete it)"
            )


def main(args: argparse.Namespace) -> Path:
    info = setup_distributed(args.device)
    if args.image_size <= 0 or args.batch_size <= 0 or args.num_workers < 0:
        raise ValueError("--image-size and --batch-size must be positive and --num-workers >= 0")
    index = ImageFolderIndex(args.data_path)
    empty_line = index.empty_classes_line(args.on_empty)  # raises with --on-empty fail
    if empty_line and info.is_main:
        print(empty_line)
    if args.num_classes is not None and len(index.classes) > args.num_classes:
        raise ValueError(
            f"--data-path {args.data_path} has {len(index.classes)} class folders, more than --num-classes "
            f"{args.num_classes}"
        )
    if info.is_main and (given := [flag for flag in NO_EFFECT if getattr(args, flag[2:].replace("-", "_"))]):
        print(f"note: {', '.join(given)} have no effect on extraction (accepted for the authors' commands)")
    codec = load_vae(args.vae, info.device)
    if args.image_size % codec.downsample:
        raise ValueError(
            f"--image-size {args.image_size} must be a multiple of the VAE's factor {codec.downsample} "
            f"(any size works with --vae none)"
        )
    out = Path(args.features_path)
    feat_dir, label_dir = out / f"imagenet{args.image_size}_features", out / f"imagenet{args.image_size}_labels"
    vae = str(Path(args.vae).resolve()) if args.vae != "none" and Path(args.vae).exists() else args.vae
    config = dict(
        vae=vae, image_size=args.image_size, global_seed=args.global_seed, num_images=len(index),
        classes=index.classes, num_classes=len(index.classes), model=args.model, data_path=str(Path(args.data_path)),
        views=2, view_order=["original", "hflip"], latent_scale=1.0 if args.vae == "none" else LATENT_SCALE,
        latent="pixels" if args.vae == "none" else "posterior sample, noise seeded by (global_seed, index)",
        features_dir=feat_dir.name, labels_dir=label_dir.name, empty_classes=index.empty_classes,
    )  # fmt: skip
    check_manifest(out, config)
    feat_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        write_json_atomic(out / "manifest.json", {**(read_manifest(out) or {}), **config, "complete": False})

    done = done_indices(feat_dir, label_dir)
    mine = [i for i in range(info.rank, len(index), info.world_size) if i not in done]
    loader = DataLoader(
        CroppedImages(index, mine, args.image_size), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, collate_fn=collate_images, pin_memory=info.device.type == "cuda",
    )  # fmt: skip
    failed: list[tuple[int, str]] = []
    written = 0
    with progress_bar(total=len(mine), unit="img", disable=not info.is_main, desc="extract") as bar:
        for batch in loader:
            for i, err in batch["failed"]:
                if args.strict:
                    raise ValueError(f"cannot read image {index[i][0]}: {err} (drop --strict to skip it)")
                failed.append((i, err))
            if len(batch["index"]):
                ids = batch["index"].tolist()
                z = encode_views(codec, batch["image"].to(info.device), ids, args.global_seed).cpu().numpy()
                for i, y, zi in zip(ids, batch["label"].tolist(), z):
                    save_npy_atomic(label_dir / f"{i}.npy", np.array([y], dtype=np.int64))  # label first
                    save_npy_atomic(feat_dir / f"{i}.npy", zi.astype(np.float32))
                written += len(ids)
            bar.update(len(batch["index"]) + len(batch["failed"]))

    barrier()
    results = [(written, failed)]
    if info.distributed:
        results = [None] * info.world_size
        dist.all_gather_object(results, (written, failed))
    if info.is_main:
        written = sum(r[0] for r in results)
        failed = sorted(f for r in results for f in r[1])
        done = done_indices(feat_dir, label_dir)
        first = feat_dir / f"{min(done)}.npy" if done else None
        packed = (out / "features.npy").is_file()
        kept = {k: v for k, v in (read_manifest(out) or {}).items() if k.startswith("packed")} if packed else {}
        manifest = {
            **config, **kept, "complete": True, "count": len(done), "layout": "files+packed" if packed else "files",
            "latent_shape": list(np.load(first, mmap_mode="r").shape[1:]) if first else None,
            "skipped": len(failed), "skipped_paths": [str(index[i][0]) for i, _ in failed[:1000]],
            "skipped_errors": [e for _, e in failed[:1000]], "world_size": info.world_size,
        }  # fmt: skip
        write_json_atomic(out / "manifest.json", manifest)
        print(f"{len(done)} of {len(index)} images encoded ({written} new) into {feat_dir} and {label_dir}")
        if failed:
            examples = ", ".join(str(index[i][0]) for i, _ in failed[:3])
            print(
                f"skipped {len(failed)} unreadable images (e.g. {examples}; the first: {failed[0][1]}); listed in "
                f"{out / 'manifest.json'} (--strict stops at the first)"
            )
        if done and (args.packed or (packed and written)):  # an existing packed copy must not go stale
            dtype = kept.get("packed_dtype", "float16")
            pack_features(out, dtype=dtype, name=f"imagenet{args.image_size}")
            print(f"packed layout ({dtype}) written to {out / 'features.npy'} and {out / 'labels.npy'}")
        print(f"manifest: {out / 'manifest.json'}")
    cleanup()
    return out


if __name__ == "__main__":
    run(lambda: main(parse_args()))
