"""The authors' ``scripts/metrics/clip_features.py``: CLIP text features of caption files, for clip_score.py.

    python scripts/metrics/clip_features.py --dataset_path data/captions --clip_model ViT-B/32

writes one projected (not normalised) CLIP text feature per caption file ``<stem>.txt`` as float32 ``<stem>.npy``
in ``data/ViT-B-32_clip_features/`` (the folder beside ``--dataset_path``). The model loads with transformers as
our metrics do: OpenAI's ``ViT-B/32`` is the hub's ``openai/clip-vit-base-patch32``; a hub id or a local CLIP
folder works too. Captions longer than 77 tokens are truncated. No ``-m aptp`` equivalent: ``python -m
aptp.evaluate IMAGES --metrics clip`` embeds the prompts of ``prompts.json`` itself.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `python scripts/metrics/...`
from aptp.authors_cli import note_ignored  # noqa: E402
from aptp.authors_metrics import write_text_features  # noqa: E402
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run  # noqa: E402
from diffcompress.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_path", required=True, help="folder of caption .txt files, one caption per file")
    p.add_argument("--clip_model", default="ViT-B/32", help="OpenAI CLIP name, hub id or local CLIP folder")
    p.add_argument(
        "--num_workers", type=non_negative_int, default=None, help="accepted; captions are read in this process"
    )
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--output_dir", help="ours: default <dataset_path>/../<model>_clip_features")
    p.add_argument("--device", help="ours: cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    if args.num_workers is not None:
        note_ignored(["--num_workers"], "reading text files needs no worker processes")
    from diffcompress.distributed import resolve_device  # here: torch loads only once the flags are read

    device = str(resolve_device(args.device))
    return write_text_features(args.dataset_path, args.clip_model, args.batch_size, device, args.output_dir)


if __name__ == "__main__":
    run(main)
