"""The authors' ``scripts/metrics/clip_score.py``: the CLIP score of generated images against precomputed text
features (clip_features.py).

    python scripts/metrics/clip_score.py --gen_images_dir G --text_features_dir data/ViT-B-32_clip_features \\
        --result_dir R --dataset_name coco --clip_model ViT-B/32

pairs the i-th image of ``G`` with the i-th ``.npy`` feature, both in sorted file-name order (as theirs), and appends
``CLIP score <value>  dataset=...`` to ``R/clip_score.txt``. The score is ours (``aptp.metrics.clip_score``, what
``aptp.evaluate --metrics clip`` reports): the mean over pairs of ``100 * max(cos, 0)``; the authors' mean of ``100 *
cos`` is the same number unless a cosine is negative (never with real CLIP models and captions; a note says so when it
happens). No ``-m aptp`` equivalent: ``python -m aptp.evaluate G --metrics clip`` embeds the prompts of
``G/prompts.json`` itself.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `python scripts/metrics/...`
from aptp.authors_metrics import append_result, clip_score_of_folders  # noqa: E402
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run  # noqa: E402
from diffcompress.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen_images_dir", required=True, help="generated images (PNG/JPG)")
    p.add_argument("--text_features_dir", required=True, help="one .npy text feature per image (clip_features.py)")
    p.add_argument("--result_dir", required=True, help="clip_score.txt gets one line per run")
    p.add_argument("--dataset_name", required=True, help="recorded in the result line")
    p.add_argument("--clip_model", default="ViT-B/32", help="OpenAI CLIP name, hub id or local CLIP folder")
    p.add_argument("--num_workers", type=non_negative_int, default=4, help="DataLoader workers reading the images")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--device", help="ours: cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        raise UserError("--batch_size must be positive and --num_workers not negative")
    from diffcompress.distributed import resolve_device  # here: torch loads only once the flags are read

    device = str(resolve_device(args.device))
    value, pairs = clip_score_of_folders(
        args.gen_images_dir, args.text_features_dir, args.clip_model, args.batch_size, args.num_workers, device
    )
    append_result(
        Path(args.result_dir) / "clip_score.txt",
        f"CLIP score {value:.4f}  dataset={args.dataset_name}  gen_images_dir={Path(args.gen_images_dir).resolve()}  "
        f"text_features_dir={Path(args.text_features_dir).resolve()}  pairs={pairs}  model={args.clip_model}",
    )
    return value


if __name__ == "__main__":
    run(main)
