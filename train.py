"""Fine-tune a DiT (full or pruned) on extracted features: the paper's recovery recipe.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-D14/2 \
        --load-weight outputs/pruned/DiT-D14-Learned.pt --data-path data/imagenet_encoded --epochs 100 \
        --prefix D14-Learned-Finetuning          # the TinyFusion README: 500K steps at batch 256 on ImageNet
    python train.py --model DiT-S/2 --data-path features/ --image-size 32 --max-steps 100   # CPU

Checkpoints go to <results-dir>/<prefix>-<model>/checkpoints/<step:07d>.pt, with the authors' --results-dir
default ``outputs`` (e.g. outputs/D14-Learned-Finetuning-DiT-D14-2/checkpoints/0500000.pt); ``--resume auto``
continues from the newest. The run lasts ``--epochs`` (default 1400, DiT's) of full global batches, the
cosine lr moving once per epoch as the authors' scheduler, or ``--max-steps`` steps (cosine per step).

The authors' ``--vae``, ``--strict`` and ``--strong-aug`` are accepted. Training reads extracted latents, so
``--vae`` (ema | mse | none | a local VAE folder) names the VAE the features must come from and is checked
against their manifest. Weights load strictly whether or not ``--strict`` is given. ``--strong-aug`` has
nothing to add on latents: every step already draws the original or the flipped view (a note is printed).
"""

from __future__ import annotations

import argparse

from diffcompress.checkpoint import load_dit_weights, read_metadata
from diffcompress.cli import ArgumentParser, positive_int, run
from diffcompress.data import check_features_vae, open_features
from diffcompress.distributed import cleanup, seed_everything, setup_distributed
from diffcompress.downloads import resolve_checkpoint
from diffcompress.trainer import TrainResult, add_training_args, diffusion_objective, train
from diffusion import create_diffusion
from models_with_layer_pruning import DiT_models, create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(DiT_models), default="DiT-XL/2")
    p.add_argument("--data-path", required=True, help="extracted features (either layout of extract_features.py)")
    p.add_argument(
        "--depth", type=positive_int, default=None, help="override the model's depth (a model pruned from it)"
    )
    p.add_argument("--load-weight", default=None, help="initial weights: a full or pruned checkpoint")
    p.add_argument(
        "--image-size", type=positive_int, default=None, help="checked against the features (latents = size / 8)"
    )
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--vae", default=None,
                   help="ema | mse | none | a local VAE folder: the VAE the features were encoded with, checked "
                        "against their manifest (default: not checked)")  # fmt: skip
    p.add_argument("--strict", action="store_true", help="load weights strictly (always so here; accepted)")
    p.add_argument("--strong-aug", action="store_true", help="accepted; on latents the flip view is always drawn")
    add_training_args(p, epochs=1400)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> TrainResult:
    info = setup_distributed(args.device)
    args.load_weight = resolve_checkpoint(args.load_weight, "--load-weight")  # a released name or run prefix
    seed_everything(args.global_seed, info.rank, info.world_size)
    dataset = open_features(args.data_path, args.image_size, args.num_classes)
    check_features_vae(args.vae, dataset)
    if args.strong_aug and info.is_main:
        print("--strong-aug: the features are latents; each step already draws the original or flipped view")
    channels, latent, _ = dataset.latent_shape
    depth = {"depth": args.depth} if args.depth else {}
    model = create_model(args.model, input_size=latent, num_classes=args.num_classes, in_channels=channels, **depth)
    if args.load_weight:  # a resumed checkpoint overrides these weights
        load_dit_weights(model, args.load_weight, flag="--load-weight")
        meta = read_metadata(args.load_weight)
        if info.is_main and meta:
            print(f"initialised from {args.load_weight} (kept blocks {meta.get('kept_indices')})")
    try:
        return train(args, info, model, diffusion_objective(create_diffusion("")), dataset)
    finally:
        cleanup()


if __name__ == "__main__":
    run(lambda: main(parse_args()))
