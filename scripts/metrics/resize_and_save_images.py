"""The authors' ``scripts/metrics/resize_and_save_images.py``: reference images as resized uint8 arrays.

    python scripts/metrics/resize_and_save_images.py --data_dir refs/ --output_dir refs_256/ --size 256 256

saves every image directly in ``--data_dir`` as ``<output_dir>/<stem>.npy``: RGB, uint8 ``[height, width, 3]``,
resized with cv2.resize's bilinear arithmetic (``aptp.data.resize_like_cv2``; ``--size`` is cv2's ``(width,
height)``), the whole image, aspect ratio not kept. Ours: ``python -m aptp.generate ... --save_references
--reference_preprocess authors`` writes the same pixels as PNGs beside generated images; ``python -m aptp.evaluate
--reference_preprocess authors`` applies the resize itself.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `python scripts/metrics/...`
from aptp.authors_metrics import resize_folder  # noqa: E402
from diffcompress.cli import ArgumentParser, positive_int, run  # noqa: E402
from diffcompress.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder of images")
    p.add_argument("--output_dir", required=True, help="one <stem>.npy per image")
    p.add_argument("--size", type=positive_int, nargs=2, default=[256, 256], metavar=("WIDTH", "HEIGHT"))
    args = p.parse_args(argv)
    if min(args.size) < 1:
        raise UserError(f"--size {args.size[0]} {args.size[1]}: expected two positive sizes, WIDTH HEIGHT")
    return resize_folder(args.data_dir, args.output_dir, *args.size)


if __name__ == "__main__":
    run(main)
