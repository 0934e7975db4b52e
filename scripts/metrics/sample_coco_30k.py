"""The authors' ``scripts/metrics/sample_coco_30k.py``: the COCO-30k evaluation set from a COCO 2014 folder.

    python scripts/metrics/sample_coco_30k.py --data_dir data/coco --seed 42 --num_samples 30000

draws ``--num_samples`` distinct val2014 images with their first caption (``aptp.data.coco30k``: the draw
``aptp.generate --coco30k`` and ``aptp.evaluate --coco30k`` use, so the three agree) and writes
``<data_dir>/images/val2014_30k/<stem>.npy`` (RGB uint8 256 x 256, cv2.resize's bilinear arithmetic) and
``<data_dir>/annotations/captions_val2014_30k.json`` (one caption per image, in draw order). Images already written
are kept (the same image always gives the same array), so an interrupted run resumes. No ``-m aptp`` equivalent: our
stages draw the set themselves from ``--coco30k COCO_DIR``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `python scripts/metrics/...`
from aptp.authors_metrics import sample_coco30k  # noqa: E402
from aptp.data import COCO30K_SEED, COCO30K_SIZE  # noqa: E402
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run  # noqa: E402
from diffcompress.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="COCO 2014: annotations/captions_val2014.json, images/val2014/")
    p.add_argument("--seed", type=non_negative_int, default=COCO30K_SEED)
    p.add_argument("--num_samples", type=positive_int, default=COCO30K_SIZE)
    args = p.parse_args(argv)
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be positive, got {args.num_samples}")
    return sample_coco30k(args.data_dir, args.seed, args.num_samples)


if __name__ == "__main__":
    run(main)
