"""Massive activations per block of a DiT: the paper's figure behind Masked KD.

    python visualize_activations.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --data-path features

Runs the model on noised latents (``--data-path`` features, or N(0, 1) latents without one) at ``--timesteps``,
records every block's output h [batch, tokens, hidden] and reports, per block:
  - max |h| over the batch, and the median |h| for scale;
  - the share of positions that Masked KD masks at k std (``--mask-std``, several allowed): per sample,
    mean and (unbiased) std over tokens and channels, masked where |h - mean| >= k * std, exactly as
    train_masked_kd.py's mask; averaged over samples.
Writes ``--out`` (PNG: max |h| on a log scale above, masked share below) and the numbers beside it as
``<out>.json``, and prints both paths.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcompress.checkpoint import load_dit_weights
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run
from diffcompress.errors import UserError
from diffusion import create_diffusion
from models_with_layer_pruning import DiT, DiT_models, create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-XL/2", help="registered model name (DiT-XL/2, DiT-D14/2, ...)")
    p.add_argument("--ckpt", default=None, help="weights: a state dict, training checkpoint or safetensors file")
    p.add_argument("--random-init", action="store_true", help="no --ckpt: random weights (a smoke test only)")
    p.add_argument("--depth", type=positive_int, default=None, help="override the model's depth (a pruned model)")
    p.add_argument("--data-path", default=None, help="feature folder (extract_features.py); default N(0,1) latents")
    p.add_argument("--image-size", type=positive_int, default=256, help="image size: latents are image-size / 8")
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--num-samples", type=positive_int, default=16, help="latents per timestep")
    p.add_argument("--timesteps", default="100,500,900", help="comma-separated diffusion timesteps to noise to")
    p.add_argument("--mask-std", default="2,4", help="comma-separated k: share masked at |h - mean| >= k std")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default="outputs/activations/massive_activations.png", help="PNG path")
    args = p.parse_args(argv)
    args.timesteps = _numbers(args.timesteps, int, "--timesteps")
    args.mask_std = _numbers(args.mask_std, float, "--mask-std")
    if any(k <= 0 for k in args.mask_std):
        p.error("--mask-std values must be positive")
    if args.ckpt is None and not args.random_init:
        p.error("--ckpt is required (pass --random-init to look at random weights)")
    if args.num_samples < 1:
        p.error("--num-samples must be at least 1")
    return args


def _numbers(text: str, kind, flag: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated numbers") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


# --------------------------------------------------------------------------------------------- numbers


def masked_share(h: torch.Tensor, k: float) -> torch.Tensor:
    """Per sample, the share of positions of h [B, ...] that Masked KD masks: |h - mean| >= k std (per-sample
    mean and unbiased std over all other dims, as train_masked_kd.mask_massive)."""
    dims = tuple(range(1, h.dim()))
    mean, std = h.mean(dim=dims, keepdim=True), h.std(dim=dims, keepdim=True)
    return ((h - mean).abs() >= k * std).float().mean(dim=dims)


@torch.no_grad()
def block_outputs(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The output of every block for one forward pass, in float32."""
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.detach().float())) for b in model.blocks]
    try:
        model(x, t, y)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def activation_stats(model: DiT, latents: torch.Tensor, labels: torch.Tensor, timesteps: list[int],
                     ks: list[float], seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Per block: max and median |h| and the masked share at each k, over all timesteps and samples."""
    diffusion = create_diffusion("")
    if any(not 0 <= t < diffusion.num_timesteps for t in timesteps):
        raise UserError(f"--timesteps {timesteps}: each must be in 0..{diffusion.num_timesteps - 1}")
    g = torch.Generator().manual_seed(seed)
    per_block: list[list[torch.Tensor]] = [[] for _ in model.blocks]
    for step in timesteps:
        t = torch.full((latents.shape[0],), step, dtype=torch.long)
        noise = torch.randn(latents.shape, generator=g)
        x = diffusion.q_sample(latents, t, noise)
        for i, h in enumerate(block_outputs(model, x, t, labels)):
            per_block[i].append(h)
    stats: dict[str, Any] = dict(block=[], max_abs=[], median_abs=[], masked_share={str(k): [] for k in ks})
    for i, hs in enumerate(per_block):
        h = torch.cat(hs)  # [timesteps * samples, tokens, hidden]
        stats["block"].append(i)
        stats["max_abs"].append(h.abs().max().item())
        stats["median_abs"].append(h.abs().median().item())
        for k in ks:
            stats["masked_share"][str(k)].append(masked_share(h, k).mean().item())
    stats.update(timesteps=list(timesteps), samples_per_timestep=int(latents.shape[0]), mask_std=list(ks))
    return stats


def load_latents(args: argparse.Namespace, model: DiT, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config["input_size"]
    shape = (model.in_channels, size, size)
    if args.data_path is None:
        return torch.randn(args.num_samples, *shape, generator=g), torch.randint(
            model.num_classes, (args.num_samples,), generator=g
        )
    from diffcompress.data import open_features

    dataset = open_features(args.data_path, args.image_size, args.num_classes)
    if tuple(dataset.latent_shape) != shape:
        raise UserError(f"--data-path {args.data_path}: latents {list(dataset.latent_shape)}, the model takes {shape}")
    picks = torch.randperm(len(dataset), generator=g)[: args.num_samples].tolist()
    items = [dataset[i] for i in picks]
    return torch.stack([x[0] for x, _ in items]), torch.tensor([y for _, y in items])  # view 0: the original


# ------------------------------------------------------------------------------------------------ plot


def draw(stats: dict[str, Any], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = np.array(stats["block"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, constrained_layout=True)
    top.bar(blocks, stats["max_abs"], color="tab:red", label="max |h|")
    top.plot(blocks, stats["median_abs"], "k.-", lw=1, label="median |h|")
    top.set_yscale("log")
    top.set_ylabel("|activation| (block output)")
    top.set_title(title)
    top.legend(loc="upper left")
    width = 0.8 / len(stats["mask_std"])
    for j, k in enumerate(stats["mask_std"]):
        share = 100 * np.array(stats["masked_share"][str(k)])
        bottom.bar(blocks + (j - (len(stats["mask_std"]) - 1) / 2) * width, share, width, label=f"k = {k:g} std")
    bottom.set_ylabel("masked share (%)")
    bottom.set_xlabel("block")
    bottom.set_xticks(blocks)
    bottom.legend(loc="upper left", title="Masked KD at")
    bottom.grid(axis="y", alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> dict[str, Any]:
    g = torch.Generator().manual_seed(args.seed)
    if args.image_size % 8:
        raise UserError(f"--image-size {args.image_size} is not a multiple of 8 (latents are image-size / 8)")
    kw = dict(input_size=args.image_size // 8, num_classes=args.num_classes)
    if args.depth:
        kw["depth"] = args.depth
    if args.model in DiT_models and DiT_models[args.model].arch["groups"]:
        raise UserError(f"--model {args.model} is a pruning model (gates skip blocks): give a plain one, e.g. DiT-XL/2")
    model = create_model(args.model, **kw)
    if args.ckpt:
        load_dit_weights(model, args.ckpt, flag="--ckpt")
    model.eval()
    latents, labels = load_latents(args, model, g)
    stats = activation_stats(model, latents, labels, args.timesteps, args.mask_std, seed=args.seed)
    stats.update(model=args.model, ckpt=args.ckpt, data_path=args.data_path)
    out = Path(args.out)
    weights = Path(args.ckpt).name if args.ckpt else "random weights"
    draw(stats, out, f"massive activations per block: {args.model} ({weights}), t in {args.timesteps}")
    numbers = out.with_name(out.name + ".json")
    numbers.write_text(json.dumps(stats, indent=1) + "\n")
    top = int(np.argmax(stats["max_abs"]))
    shares = [f"{k:g} std masks {100 * max(stats['masked_share'][str(k)]):.3f}% at most" for k in args.mask_std]
    print(f"largest |h| {stats['max_abs'][top]:.1f} at block {top}; {', '.join(shares)}")
    print(f"wrote {out} and {numbers}")
    return stats


if __name__ == "__main__":
    run(lambda: main(parse_args()))
