"""Depth-prune a DiT by block influence (ShortGPT's BI): drop the blocks that change their input the least.

    python prune_by_score.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --save-model outputs/pruned/DiT-D14-Score.pt --n-pruned 14   # the TinyFusion README: data/imagenet/train
    python prune_by_score.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --data-path features/ \
        --n-pruned 14 --save-model pruned/bi-D14.pt                  # extracted features: no VAE needed
    python prune_by_score.py ... --legacy-bi                               # the TinyFusion authors' inputs

BI of block i = 1 - cos(input, output), the cosine over the hidden dimension, averaged over every token of
every calibration sample (``--nsamples``, a seeded random subset of ``--data-path``). The ``--n-pruned``
blocks with the lowest BI go; the last block always stays. Calibration inputs are noised latents
x_t = q_sample(x_0, t) with t uniform over the model's 1000 steps. ``--legacy-bi`` reproduces the paper's
ShortGPT row instead: the authors fed CLEAN latents x_0 with t uniform in [0, 250).

``--data-path`` (default ``data/imagenet/train``, as the authors') takes an image class-folder tree,
center-cropped to ``--image-size`` (256) and encoded through ``--vae`` (ema), or extracted features (either
layout of extract_features.py; view 0, the un-flipped image). ``--cfg-scale`` and ``--num-sampling-steps``
are accepted for the authors' commands and have no effect: scoring runs one forward pass per sample.
The output is a plain state dict of the kept blocks (renumbered) with the kept indices, the scores and the
source model in ``<file>.json``; fine-tune it with train.py.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from diffcompress.checkpoint import load_dit_weights, model_hint, save_pruned
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run
from diffcompress.data import CroppedImages, FeatureDataset, ImageFolderIndex, collate_images
from diffcompress.distributed import resolve_device
from diffcompress.downloads import resolve_checkpoint
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar
from diffcompress.vae import load_vae
from diffusion import create_diffusion
from models_with_layer_pruning import DiT, DiT_models, create_model

PLAIN_MODELS = [name for name, build in DiT_models.items() if build.arch["groups"] is None]
DEFAULT_DATA_PATH = "data/imagenet/train"  # the authors' default
DEFAULT_IMAGE_SIZE = 256
LEGACY_T_MAX = 250  # the authors' script drew t from [0, 250) on a model trained over 1000 steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=PLAIN_MODELS, default="DiT-XL/2", help="the source model's registry name")
    p.add_argument("--ckpt", default=None, help="source weights (state dict, training checkpoint or safetensors)")
    p.add_argument("--no-ema", action="store_true", help="use 'model' instead of 'ema' from a training checkpoint")
    p.add_argument(
        "--data-path",
        default=DEFAULT_DATA_PATH,
        help=f"an image folder <path>/<class>/<images>, or extracted features (default {DEFAULT_DATA_PATH})",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="images: crop size (default 256); features: checked against the latents when given",
    )
    p.add_argument("--vae", default="ema", help="images only: ema | mse | a local diffusers VAE folder | none")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--nsamples", type=positive_int, default=128, help="calibration samples (a seeded random subset)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-workers", type=non_negative_int, default=2, help="images only: data loader workers")
    p.add_argument(
        "--pruner",
        default="bi",
        choices=["bi", "shortgpt"],
        help="the block score: ShortGPT's block influence (bi and shortgpt name the same score)",
    )
    p.add_argument("--cfg-scale", type=float, default=None, help="accepted for the authors' commands; no effect")
    p.add_argument(
        "--num-sampling-steps",
        type=positive_int,
        default=None,
        help="accepted for the authors' commands; no effect (scoring samples nothing)",
    )
    p.add_argument("--n-pruned", type=positive_int, required=True, help="how many blocks to remove")
    p.add_argument("--legacy-bi", action="store_true",
                   help=f"the authors' inputs: clean latents with t uniform in [0, {LEGACY_T_MAX})")  # fmt: skip
    p.add_argument("--save-model", default=None, help="output path of the pruned state dict (.pt or .safetensors)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the calibration subset, timesteps and noise")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- calibration data


def is_feature_folder(path: Path) -> bool:
    """Extracted features (packed ``features.npy`` or ``<name>_features`` + ``<name>_labels``), not images."""
    return (path / "features.npy").is_file() or any(
        d.is_dir() and (path / f"{d.name[: -len('_features')]}_labels").is_dir() for d in path.glob("*_features")
    )


@dataclass
class Calibration:
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # (x0 [B, C, H, W], labels [B]), lazily
    labels: torch.Tensor  # of every chosen sample, known before any encoding: checked up front
    channels: int
    latent_size: int
    source: str


def feature_calibration(args: argparse.Namespace, generator: torch.Generator) -> Calibration:
    dataset = FeatureDataset(args.data_path)
    channels, latent, _ = dataset.latent_shape
    if args.image_size is not None and latent not in (args.image_size, args.image_size // 8):
        raise ValueError(
            f"--image-size {args.image_size} does not fit the {latent}x{latent} features in {args.data_path}"
        )
    chosen = _subset(len(dataset), args.nsamples, generator)
    items = [dataset[i] for i in chosen]  # --nsamples latents: small enough to hold
    x0 = torch.stack([x[0] for x, _ in items])  # view 0: the un-flipped image
    labels = torch.tensor([y for _, y in items])
    batches = (
        (x0[i : i + args.batch_size], labels[i : i + args.batch_size]) for i in range(0, len(x0), args.batch_size)
    )
    source = f"features {args.data_path} ({dataset.layout} layout, view 0)"
    return Calibration(batches, labels, channels, latent, source)


def image_calibration(args: argparse.Namespace, generator: torch.Generator, device: torch.device) -> Calibration:
    index = ImageFolderIndex(args.data_path)
    if len(index.classes) > args.num_classes:
        raise ValueError(
            f"{args.data_path} has {len(index.classes)} class folders, more than --num-classes {args.num_classes}"
        )
    codec = load_vae(args.vae, device)
    size = args.image_size or DEFAULT_IMAGE_SIZE
    if size % codec.downsample:
        raise ValueError(f"--image-size {size} must be a multiple of the VAE's factor {codec.downsample}")
    latent = size // codec.downsample
    chosen = _subset(len(index), args.nsamples, generator)
    loader = DataLoader(
        CroppedImages(index, chosen, size), batch_size=args.batch_size, shuffle=False,
        num_workers=args.num_workers, collate_fn=collate_images,
    )  # fmt: skip

    def batches():
        for batch in loader:
            for i, err in batch["failed"]:
                print(f"warning: skipping unreadable image {index[i][0]} ({err})")
            if len(batch["index"]):
                images = batch["image"].to(device)
                noise = torch.randn((len(images), codec.channels, latent, latent), generator=generator)
                yield codec.encode(images, noise=noise.to(device)).float().cpu(), batch["label"]

    labels = torch.from_numpy(index.labels[chosen])
    return Calibration(batches(), labels, codec.channels, latent, f"images {args.data_path} via --vae {args.vae}")


def _subset(size: int, nsamples: int, generator: torch.Generator) -> list[int]:
    if nsamples <= 0:
        raise ValueError(f"--nsamples must be positive, got {nsamples}")
    if nsamples > size:
        print(f"note: --nsamples {nsamples} but the data holds {size} samples: using all of them")
    return torch.randperm(size, generator=generator)[:nsamples].tolist()


# ----------------------------------------------------------------------------------- block influence


class BlockInfluence:
    """Forward hooks on every block accumulating cos(input, output) over the hidden dimension, in float64."""

    def __init__(self, model: DiT):
        self.sums = [0.0] * len(model.blocks)
        self.counts = [0] * len(model.blocks)
        self.handles = [block.register_forward_hook(self._hook(i)) for i, block in enumerate(model.blocks)]

    def _hook(self, i: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            cos = F.cosine_similarity(args[0].double(), output.double(), dim=-1)  # [B, tokens]
            self.sums[i] += cos.sum().item()
            self.counts[i] += cos.numel()

        return hook

    def scores(self) -> list[float]:
        """BI per block: 1 - the mean cosine similarity over all tokens of all samples seen (>= 0: a cosine
        is at most 1, so a negative value is rounding and reads 0). A NaN or inf similarity (NaN or inf activations)
        is an error naming the blocks: clamped to 0 it would read "least influential" and remove the wrong blocks."""
        if min(self.counts) == 0:
            raise RuntimeError(f"blocks {[i for i, c in enumerate(self.counts) if c == 0]} never ran")
        if bad := [i for i, s in enumerate(self.sums) if not math.isfinite(s)]:
            raise UserError(
                f"the block scores of blocks {bad} are not finite (NaN or inf activations, from the --ckpt weights or "
                f"the --data-path inputs): no blocks are chosen and nothing is written"
            )
        return [max(0.0, 1.0 - s / c) for s, c in zip(self.sums, self.counts)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def block_influence(
    model: DiT,
    calibration: Calibration,
    generator: torch.Generator,
    device: torch.device,
    legacy: bool = False,
    batch_size: int = 32,
) -> tuple[list[float], int]:
    """(BI of every block of ``model`` in eval mode, samples seen) over the calibration batches.

    Default: x_t = q_sample(x_0, t, noise) with t ~ U{0..999} (the model's whole diffusion). ``legacy``: the
    clean x_0 goes straight in with t ~ U{0..249}, as the TinyFusion authors' script did.
    """
    model.eval()
    diffusion = create_diffusion("")
    meter = BlockInfluence(model)
    seen = 0
    try:
        total = math.ceil(len(calibration.labels) / batch_size)
        for x0, y in progress_bar(calibration.batches, desc="calibration", unit="batch", total=total):
            seen += len(x0)
            if legacy:
                t = torch.randint(0, LEGACY_T_MAX, (len(x0),), generator=generator)
                x = x0
            else:
                t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=generator)
                x = diffusion.q_sample(x0, t, noise=torch.randn(x0.shape, generator=generator))
            model(x.to(device), t.to(device), y.to(device))
    finally:
        meter.remove()
    if not seen:
        raise ValueError("no calibration sample could be read")
    return meter.scores(), seen


def select_blocks(scores: list[float], n_pruned: int) -> tuple[list[int], list[int]]:
    """(kept, removed), both ascending: the ``n_pruned`` lowest-BI blocks go, never the last (ties: lower index)."""
    depth = len(scores)
    if not 0 < n_pruned < depth:
        raise ValueError(
            f"--n-pruned {n_pruned} does not fit a model of depth {depth}: remove between 1 and {depth - 1} blocks "
            f"(the last block always stays)"
        )
    candidates = sorted(range(depth - 1), key=lambda i: (scores[i], i))
    removed = sorted(candidates[:n_pruned])
    return [i for i in range(depth) if i not in removed], removed


# ------------------------------------------------------------------------------------------------ main


@dataclass
class ScoreResult:
    scores: list[float]
    nsamples: int
    kept: list[int]
    removed: list[int]
    params_before: int
    params_after: int
    path: Path | None


def main(args: argparse.Namespace) -> ScoreResult:
    if not args.ckpt:
        raise UserError("--ckpt is required: the block scores of a randomly initialised model mean nothing")
    args.ckpt = resolve_checkpoint(args.ckpt)  # a released name (downloaded once) or a run folder's prefix
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("prune_by_score.py runs as one process: start it with python, not torchrun")
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    device = resolve_device(args.device)
    data_path = Path(args.data_path)
    if not data_path.is_dir():
        default = " (the default)" if args.data_path == DEFAULT_DATA_PATH else ""
        raise UserError(
            f"--data-path {args.data_path}{default} is not a folder: pass --data-path with an ImageNet-style folder "
            f"(<path>/<class>/<images>) or the features written by extract_features.py"
        )
    given = (("--cfg-scale", args.cfg_scale), ("--num-sampling-steps", args.num_sampling_steps))
    if unused := [flag for flag, value in given if value is not None]:
        print(f"note: {' and '.join(unused)} have no effect on block scores (one forward pass per sample)")
    depth = DiT_models[args.model].arch["depth"]
    select_blocks([0.0] * depth, args.n_pruned)  # a bad --n-pruned fails before any work

    generator = torch.Generator().manual_seed(args.seed)
    if is_feature_folder(data_path):
        calibration = feature_calibration(args, generator)
    else:
        calibration = image_calibration(args, generator, device)
    if int(calibration.labels.max()) >= args.num_classes:
        raise ValueError(
            f"the data holds label {int(calibration.labels.max())}, beyond --num-classes {args.num_classes}"
        )
    model = create_model(
        args.model, input_size=calibration.latent_size, num_classes=args.num_classes, in_channels=calibration.channels
    )
    load_dit_weights(model, args.ckpt, use_ema=not args.no_ema, flag="--ckpt")
    model.to(device).eval()

    inputs = (
        f"clean latents, t ~ U[0, {LEGACY_T_MAX}) (--legacy-bi)"
        if args.legacy_bi
        else "noised latents q_sample(x0, t), t ~ U[0, 1000)"
    )
    count = len(calibration.labels)
    print(f"scoring {depth} blocks of {args.model} on {count} samples of {calibration.source}: {inputs}")
    scores, count = block_influence(model, calibration, generator, device, args.legacy_bi, args.batch_size)
    kept, removed = select_blocks(scores, args.n_pruned)

    print(f"{'block':>5}  {'BI':>10}  decision")
    for i, bi in enumerate(scores):
        note = "removed" if i in removed else "kept" + (" (last block: always kept)" if i == depth - 1 else "")
        print(f"{i:>5}  {bi:>10.6f}  {note}")
    print(f"kept indices: {kept}")
    print(f"removed indices: {removed}")

    shallow = model.pruned(kept)
    before, after = model.num_params(), shallow.num_params()
    print(f"{args.model}: {depth} -> {len(kept)} blocks, params {before / 1e6:.2f}M -> {after / 1e6:.2f}M")
    path = None
    if args.save_model:
        state_dict = {k: v.cpu() for k, v in shallow.state_dict().items()}
        path = save_pruned(
            state_dict, args.save_model, kept_indices=kept, source_model=args.model, method="bi-score",
            scores=scores, removed_indices=removed, legacy_bi=args.legacy_bi, nsamples=count,
            calibration_inputs=inputs, seed=args.seed, source_ckpt=str(args.ckpt), data_path=str(args.data_path),
        )  # fmt: skip
        print(f"saved the pruned model to {path} (kept indices and scores in {path}.json)")
        print(model_hint(state_dict, args.model))
    else:
        print("no --save-model given: nothing written")
    return ScoreResult(scores, count, kept, removed, before, after, path)


if __name__ == "__main__":
    run(lambda: main(parse_args()))
