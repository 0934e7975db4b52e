"""Fine-tune a DiT (full or pruned) on extracted features: the paper's recovery recipe.

    torchrun --nproc_per_node=8 train.py --model DiT-D14/2 --load-weight pruned/D14.pt \
        --data-path features/ --max-steps 100000 --global-batch-size 256 --prefix finetune
    python train.py --model DiT-S/2 --data-path features/ --image-size 32 --vae none --max-steps 100   # CPU

Checkpoints go to <results-dir>/<prefix>-<model>/checkpoints; ``--resume auto`` continues from the newest.
"""

from __future__ import annotations

import argparse

from diffcompress.checkpoint import load_dit_weights, read_metadata
from diffcompress.cli import run
from diffcompress.data import open_features
from diffcompress.distributed import cleanup, seed_everything, setup_distributed
from diffcompress.trainer import TrainResult, add_training_args, diffusion_objective, train
from diffusion import create_diffusion
from models_with_layer_pruning import DiT_models, create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(DiT_models), default="DiT-XL/2")
    p.add_argument("--data-path", required=True, help="extracted features (either layout of extract_features.py)")
    p.add_argument("--depth", type=int, default=None, help="override the model's depth (a model pruned from it)")
    p.add_argument("--load-weight", default=None, help="initial weights: a full or pruned checkpoint")
    p.add_argument("--image-size", type=int, default=None, help="checked against the features (latents = size / 8)")
    p.add_argument("--num-classes", type=int, default=1000)
    add_training_args(p)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> TrainResult:
    info = setup_distributed(args.device)
    seed_everything(args.global_seed, info.rank, info.world_size)
    dataset = open_features(args.data_path, args.image_size, args.num_classes)
    channels, latent, _ = dataset.latent_shape
    depth = {"depth": args.depth} if args.depth else {}
    model = create_model(args.model, input_size=latent, num_classes=args.num_classes, in_channels=channels, **depth)
    if args.load_weight:  # a resumed checkpoint overrides these weights
        load_dit_weights(model, args.load_weight)
        meta = read_metadata(args.load_weight)
        if info.is_main and meta:
            print(f"initialised from {args.load_weight} (kept blocks {meta.get('kept_indices')})")
    try:
        return train(args, info, model, diffusion_objective(create_diffusion("")), dataset)
    finally:
        cleanup()


if __name__ == "__main__":
    run(lambda: main(parse_args()))
