"""The authors' ``scripts/metrics/fid.py`` on our FID (clean-fid ``legacy_pytorch`` statistics, ``aptp.evaluate``).

    python scripts/metrics/fid.py --gen_dir G --result_dir R --dataset coco-30k --mode legacy_pytorch --coco30k COCO

runs ``python -m aptp.evaluate G --metrics fid --out R/fid_metrics.json --coco30k COCO --reference_preprocess
authors`` and appends the FID to ``R/fid.txt`` as one line ``FID <value>  gen_dir=...  reference=...``.

Their ``--dataset coco-30k`` names clean-fid custom statistics (``make_custom_stats("coco-30k", ...)`` of
sample_coco_30k.py's images). Here the reference is, in this order: ``--coco30k COCO_DIR`` (the same 30k draw and
cv2 resize to 256, computed from the COCO 2014 folder once and cached in ``--result_dir``), ``--ref_dir`` (reference
images), ``--ref_stats`` (an .npz with mu and sigma), or else clean-fid's own statistics file of that name, when it
exists. Only ``--mode legacy_pytorch`` is implemented (the paper's).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `python scripts/metrics/fid.py`
from aptp.authors_cli import run_stage  # noqa: E402
from aptp.authors_metrics import append_result, fid_reference_flags  # noqa: E402
from aptp.metrics import (
    FID_MODE,  # noqa: E402
    list_images,  # noqa: E402
)
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run  # noqa: E402
from diffcompress.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gen_dir", required=True, help="generated images (PNG/JPG)")
    p.add_argument("--result_dir", required=True, help="fid.txt gets one line per run")
    p.add_argument("--dataset", default="coco-30k", help="clean-fid custom statistics name (the reference)")
    p.add_argument("--mode", default=FID_MODE, help=f"clean-fid mode: only {FID_MODE}")
    ours = p.add_argument_group("ours (the reference, and how to read)")
    ours.add_argument("--coco30k", metavar="COCO_DIR", help="reference: COCO-30k of this COCO 2014 folder")
    ours.add_argument("--num_samples", type=positive_int, help="with --coco30k: the first N images of the draw")
    ours.add_argument("--ref_dir", help="reference: a folder of images")
    ours.add_argument("--ref_stats", help="reference: statistics .npz (mu, sigma)")
    ours.add_argument("--inception_weights", help="local pt_inception-2015-12-05-6726825d.pth")
    ours.add_argument("--batch_size", type=positive_int, default=64)
    ours.add_argument("--num_workers", type=non_negative_int, default=4)
    ours.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if args.mode != FID_MODE:
        raise UserError(f"--mode {args.mode}: only {FID_MODE} is implemented (the mode of the paper's FIDs)")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError(f"--num_samples must be positive, got {args.num_samples}")
    list_images(args.gen_dir, "--gen_dir")
    if args.ref_dir:
        list_images(args.ref_dir, "--ref_dir")
    reference, described = fid_reference_flags(
        args.dataset, args.coco30k, args.ref_dir, args.ref_stats, args.num_samples
    )
    out = Path(args.result_dir) / "fid_metrics.json"
    stage = [args.gen_dir, "--metrics", "fid", "--out", str(out), *reference]
    stage += ["--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers)]
    for flag, value in (("--inception-weights", args.inception_weights), ("--device", args.device)):
        stage += [flag, value] if value else []
    run_stage("aptp.evaluate", stage)
    fid = json.loads(out.read_text())["fid"]
    append_result(
        Path(args.result_dir) / "fid.txt",
        f"FID {fid['value']:.4f}  gen_dir={Path(args.gen_dir).resolve()}  dataset={args.dataset}  "
        f"reference={described}  images={fid['num_images']}  mode={args.mode}",
    )
    return fid["value"]


if __name__ == "__main__":
    run(main)
