"""Write scikit-learn's handwritten digits (1,797 images, 8x8, 10 classes) as extracted features for the demo.

    python prepare_digits.py --out data/digits          # -> data/digits/train, data/digits/heldout
    python train.py --model DiT-Digits/2 --data-path data/digits/train --image-size 8 --num-classes 10 ...

Pixels (the models run with ``--vae none``), values 0..16 scaled to [-1, 1], the grey channel replicated to 3,
one view per image (digits are not flip-invariant, so no mirrored copy), in the packed layout
(``features.npy`` [N, 1, 3, 8, 8], ``labels.npy``, ``indices.npy`` = rows of ``load_digits``, ``manifest.json``).
The held-out split is stratified: ``--heldout-fraction`` of every class, chosen by ``--seed``.
"""

from __future__ import annotations

import argparse

import numpy as np

from diffcompress.cli import ArgumentParser, non_negative_int, run, unit_float
from diffcompress.digits import prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/digits", help="output folder (gets train/ and heldout/)")
    p.add_argument("--heldout-fraction", type=unit_float, default=0.2, help="share of every class held out")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the choice of held-out images")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    paths = prepare(args.out, args.heldout_fraction, args.seed)
    for name, path in paths.items():
        labels = np.load(path / "labels.npy")
        print(f"{name}: {len(labels)} digits ({np.bincount(labels, minlength=10).tolist()} per class) -> {path}")
    return paths


if __name__ == "__main__":
    run(lambda: main(parse_args()))
