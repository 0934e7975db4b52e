"""Depth-prune a DiT by a fixed choice of blocks: an explicit list, the BK-SDM oracle, or a random N:M pattern.

    python prune_by_index.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --save-model outputs/pruned/DiT-D14-Oracle.pt \
        --kept-indices "[0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27]"   # the TinyFusion README's Oracle
    python prune_by_index.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --kept-indices paper-oracle \
        --save-model pruned/oracle-D14.pt                    # the same list by name
    python prune_by_index.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --kept-indices oracle \
        --save-model pruned/bk-sdm-D14.pt                    # [0,2,4,6,8,10,12,15,17,19,21,23,25,27]
    python prune_by_index.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --kept-indices random --groups 2:4 \
        --seed 3 --save-model pruned/random-2-4.pt

--kept-indices:
  a list        "[0,2,4]", "0,2,4" or "0 2 4": the blocks to keep (sorted; blocks keep their order).
  oracle        BK-SDM's rule: the k = --target-depth (default: half the depth) blocks evenly spaced from the
                first to the last, block round((D - 1) * i / (k - 1)) for i = 0..k-1, halves rounded up. For
                28 -> 14 this gives [0,2,4,6,8,10,12,15,17,19,21,23,25,27]; any 2 <= k < D.
  paper-oracle  the list of the TinyFusion README's Oracle command (the paper's Oracle row), 28 -> 14 only:
                [0,2,4,6,8,10,12,14,17,19,21,23,25,27]. It differs from `oracle` in one block (14, not 15).
  random        for every group of --groups (default "1:2", tiling the depth), one of its C(M, N) keep-patterns,
                uniformly at random from --seed.
The output is a plain state dict of the kept blocks renumbered 0..k-1 (the original repositories load it),
with the kept indices, source model and method in ``<file>.json``; fine-tune it with train.py.

The authors' script parses their sampling and calibration flags too (``--data-path --vae --cfg-scale
--num-sampling-steps --pruner --nsamples --batch-size``): accepted here, with no effect on a fixed choice of
blocks. ``--image-size`` (256) and ``--num-classes`` (1000), when given, are checked against the checkpoint;
otherwise both are read from it.
"""

from __future__ import annotations

import argparse
import math
import re

import numpy as np

from diffcompress.checkpoint import infer_dit_config, load_dit_weights, load_state_dict, model_hint, save_pruned
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run
from diffcompress.downloads import resolve_checkpoint
from models_with_layer_pruning import DiT_models, Groups, check_kept_indices, create_model, keep_patterns, parse_groups

PLAIN_MODELS = [name for name, build in DiT_models.items() if build.arch["groups"] is None]
BK_SDM_D14 = [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]  # what oracle_indices(28, 14) returns
PAPER_ORACLE_D14 = [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27]  # the TinyFusion README's Oracle command
# The authors' flags that do not bear on a fixed choice of blocks: accepted, noted when given.
NO_EFFECT = ("--data-path", "--vae", "--cfg-scale", "--num-sampling-steps", "--pruner", "--nsamples", "--batch-size")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=PLAIN_MODELS, default="DiT-XL/2", help="the source model's registry name")
    p.add_argument("--ckpt", required=True, help="source weights (state dict, training checkpoint or safetensors)")
    p.add_argument("--no-ema", action="store_true", help="use 'model' instead of 'ema' from a training checkpoint")
    p.add_argument("--kept-indices", required=True,
                   help="a list like '[0,2,4]' or '0,2,4' | oracle | paper-oracle | random")  # fmt: skip
    p.add_argument(
        "--target-depth", type=positive_int, default=None, help="oracle: blocks to keep (default: depth // 2)"
    )
    p.add_argument("--groups", default="1:2", help="random: N:M groups, e.g. '1:2' (tiled), '2:4,2:4' or '[[1,2]]'")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random: seeds the choice of patterns")
    p.add_argument("--save-model", default=None, help="output path of the pruned state dict (.pt or .safetensors)")
    p.add_argument(
        "--image-size", type=positive_int, default=None, help="checked against the checkpoint when given (256)"
    )
    p.add_argument(
        "--num-classes", type=positive_int, default=None, help="checked against the checkpoint when given (1000)"
    )
    g = p.add_argument_group("the authors' flags with no effect on a fixed choice of blocks")
    for flag in NO_EFFECT:
        g.add_argument(flag, default=None)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ selection


def parse_index_list(text: str) -> list[int]:
    """'[0,2,4]', '(0, 2, 4)', '0,2,4' or '0 2 4' -> [0, 2, 4]; anything else is a ValueError."""
    body = text.strip()
    if body[:1] in ("[", "(") and body[-1:] in ("]", ")"):
        body = body[1:-1]
    parts = [part for part in re.split(r"[,\s]+", body) if part]
    try:
        kept = [int(part) for part in parts]
    except ValueError:
        kept = []
    if not kept:
        raise ValueError(
            f"--kept-indices {text!r} is not a list of block indices: expected e.g. '[0,2,4]' or '0,2,4', "
            f"or 'oracle', 'paper-oracle' or 'random'"
        )
    return kept


def oracle_indices(depth: int, target_depth: int) -> list[int]:
    """``target_depth`` blocks evenly spaced from the first to the last one (BK-SDM's list for 28 -> 14)."""
    if not 2 <= target_depth < depth:
        raise ValueError(
            f"oracle: --target-depth {target_depth} does not fit a model of depth {depth}: keep between 2 and "
            f"{depth - 1} blocks (the oracle keeps the first and the last block)"
        )
    step = (depth - 1) / (target_depth - 1)  # >= 1, so the rounded positions are distinct
    return [math.floor(i * step + 0.5) for i in range(target_depth)]


def random_indices(groups: Groups, seed: int) -> list[int]:
    """One keep-pattern per [N, M] group, each of its C(M, N) patterns equally likely; global indices, ascending."""
    rng = np.random.default_rng(seed)
    kept, offset = [], 0
    for n, m in groups:
        patterns = keep_patterns(n, m)
        choice = patterns[int(rng.integers(len(patterns)))]
        kept += [offset + j for j in choice.nonzero().flatten().tolist()]
        offset += m
    return kept


def select_indices(args: argparse.Namespace, depth: int) -> tuple[list[int], str, Groups | None]:
    """(kept indices ascending, method name, groups or None) for ``--kept-indices`` on a model of ``depth``."""
    spec = args.kept_indices.strip().lower()
    groups = None
    if spec == "oracle":
        kept, method = oracle_indices(depth, depth // 2 if args.target_depth is None else args.target_depth), "oracle"
    elif spec == "paper-oracle":
        if depth != len(BK_SDM_D14) * 2:
            raise ValueError(f"--kept-indices paper-oracle is the README's list for 28 -> 14 blocks, not for a model "
                             f"of depth {depth}: use oracle")  # fmt: skip
        kept, method = list(PAPER_ORACLE_D14), "paper-oracle"
    elif spec == "random":
        groups = parse_groups(args.groups, depth)
        kept, method = random_indices(groups, args.seed), "random"
    else:
        kept, method = parse_index_list(args.kept_indices), "index"
        try:
            check_kept_indices(kept, depth)
        except ValueError as e:
            raise ValueError(f"--kept-indices {args.kept_indices!r}: {e}") from None
        if kept != sorted(kept):
            print(f"note: sorted the kept indices to {sorted(kept)} (blocks keep their order)")
            kept = sorted(kept)
    if len(kept) == depth:
        raise ValueError(f"--kept-indices {args.kept_indices!r} keeps all {depth} blocks: nothing to prune")
    if args.target_depth is not None and len(kept) != args.target_depth:
        raise ValueError(f"--kept-indices {args.kept_indices!r} keeps {len(kept)} blocks, --target-depth says "
                         f"{args.target_depth}")  # fmt: skip
    return kept, method, groups


# ------------------------------------------------------------------------------------------------ main


def main(args: argparse.Namespace) -> list[int]:
    kept, method, groups = select_indices(args, DiT_models[args.model].arch["depth"])  # fail fast, before loading
    if changed := [flag for flag in NO_EFFECT if getattr(args, flag[2:].replace("-", "_")) is not None]:
        print(f"note: {', '.join(changed)} have no effect on pruning by index (accepted for the authors' commands)")
    args.ckpt = resolve_checkpoint(args.ckpt)  # a released name (downloaded once) or a run folder's prefix
    state_dict = load_state_dict(args.ckpt, use_ema=not args.no_ema, flag="--ckpt")
    cfg = infer_dit_config(state_dict)
    latent, classes = cfg["input_size"], cfg["num_embeddings"] - 1
    if args.image_size is not None and args.image_size not in (latent, latent * 8):
        raise ValueError(f"--image-size {args.image_size} does not fit {args.ckpt}: its model takes {latent}x{latent} "
                         f"inputs (images of {latent * 8} through the VAE, or {latent} pixels)")  # fmt: skip
    if args.num_classes is not None and args.num_classes != classes:
        raise ValueError(f"--num-classes {args.num_classes} does not fit {args.ckpt}: its model has {classes} classes")
    model = create_model(
        args.model, input_size=cfg["input_size"], in_channels=cfg["in_channels"], learn_sigma=cfg["learn_sigma"],
        num_classes=classes,  # DiT trains with label dropout: the last row of the table is the null class
    )  # fmt: skip
    # strict; a wrong --model gets a one-line error naming the right one
    load_dit_weights(model, state_dict, name=f"checkpoint {str(args.ckpt)!r} (--ckpt)")
    shallow = model.pruned(kept)
    print(f"kept indices ({method}{f', groups {groups}, seed {args.seed}' if groups else ''}): {kept}")
    print(f"removed indices: {[i for i in range(model.depth) if i not in kept]}")
    before, after = model.num_params(), shallow.num_params()
    print(f"{args.model}: {model.depth} -> {len(kept)} blocks, params {before / 1e6:.2f}M -> {after / 1e6:.2f}M")
    pruned = shallow.state_dict()
    if args.save_model:
        path = save_pruned(
            pruned, args.save_model, kept_indices=kept, source_model=args.model, groups=groups, method=method,
            seed=args.seed if method == "random" else None, source_ckpt=str(args.ckpt),
        )  # fmt: skip
        print(f"saved the pruned model to {path} (kept indices in {path}.json)")
    else:
        print("no --save-model given: nothing written")
    print(model_hint(pruned, args.model))
    return kept


if __name__ == "__main__":
    run(lambda: main(parse_args()))
