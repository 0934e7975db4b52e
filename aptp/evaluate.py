"""Evaluate a folder of generated images: FID, CLIP score and CMMD, printed as a markdown table.

    python -m aptp.evaluate samples/ --ref-dir coco-val-256/ --inception-weights pt_inception-2015-12-05-6726825d.pth
    python -m aptp.evaluate samples/ --metrics clip --clip-model models/clip-vit-base-patch32
    python -m aptp.evaluate samples/ --ref-stats fid-reference.npz --ref-embeddings cmmd-reference.npz
    python -m aptp.evaluate results/coco30k/ --coco30k data/coco --reference_preprocess authors --inception-weights ...

Inputs per metric (without ``--metrics``, every metric whose inputs are given is computed):

- ``fid``: ``--ref-dir``, ``--coco30k`` or ``--ref-stats``. The reference statistics (clean-fid ``legacy_pytorch``)
  are computed from the reference images once and saved to ``--ref-stats`` (default
  ``<out dir>/fid-reference-<ref dir name>[-authors].npz``); a later run reads them while the reference files, the
  preprocessing and the Inception weights are unchanged. Both sets are first brought to ``--resolution`` (256, as in
  the paper): ``--reference_preprocess ours`` center-crops and resizes (0 keeps them as they are), ``authors``
  resizes the whole image to 256 x 256 with cv2.resize's bilinear arithmetic, as the authors' scripts did
  (``aptp.data.resize_like_cv2``), for FIDs comparable with the paper's. Images already 256 x 256 (what
  ``aptp.generate`` writes) are left as they are by both.
- ``--coco30k COCO_DIR``: the references are the paper's COCO-30k images (30,000 distinct val2014 images drawn with
  seed 42, ``aptp.data.coco30k``; ``--max_samples N``: the first N of that draw), read from the COCO folder, for FID
  and CMMD. ``aptp.generate --coco30k`` draws the matching images and ``prompts.json``.
- ``clip``: the prompts, ``--prompts`` or the folder's ``prompts.json``: a JSON object mapping image file names to
  prompts, or a JSON list in the images' natural name order (2.png before 10.png).
- ``cmmd``: ``--ref-dir``, ``--coco30k`` or ``--ref-embeddings`` (CLIP embeddings of the reference images, cached
  like the FID statistics, default ``<out dir>/cmmd-reference-<ref dir name>.npz``); the CLIP processor resizes the
  images itself, whatever ``--reference_preprocess``.

Models load from local paths or hub ids (``--clip-model``, ``--cmmd-model``; offline only from a local folder or
the hub cache). Images are the PNG/JPG/... files directly in the folder; unreadable ones are skipped and counted
(``--on-bad-image fail`` stops instead). Results go to ``metrics.json`` in the image folder (or ``--out``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffcompress.checkpoint import write_json_atomic
from diffcompress.cli import ArgumentParser, non_negative_int, positive_int, run
from diffcompress.data import to_rgb8
from diffcompress.distributed import get_logger, resolve_device
from diffcompress.errors import UserError
from diffcompress.fid_metrics import activation_statistics, frechet_distance

from .data import COCO30K_SIZE, REFERENCE_PREPROCESS, coco30k, resize_like_cv2
from .metrics import (
    CLIP_MODEL,
    CMMD_MODEL,
    CMMD_SCALE,
    CMMD_SIGMA,
    FID_MODE,
    Features,
    FidTransform,
    clip_image_embeddings,
    clip_score,
    clip_text_embeddings,
    cmmd,
    extract_features,
    files_fingerprint,
    inception_extractor,
    list_images,
    load_clip,
    load_npz,
    load_prompts,
    save_npz,
)

METRICS = ("fid", "clip", "cmmd")
NAMES = {"fid": "FID", "clip": "CLIP score", "cmmd": "CMMD"}
PROMPTS = "prompts.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="folder of generated images (PNG/JPG)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None, help="default: all whose inputs are given")
    p.add_argument("--ref-dir", default=None, help="reference images (FID and CMMD)")
    p.add_argument("--coco30k", default=None, metavar="COCO_DIR", help="references: COCO-30k of this COCO 2014 folder")
    p.add_argument(
        "--max-samples", "--max_samples", dest="max_samples", type=positive_int, default=None,
        help=f"--coco30k: the first N images of the draw (default {COCO30K_SIZE})",
    )  # fmt: skip
    p.add_argument(
        "--reference-preprocess", "--reference_preprocess", dest="reference_preprocess", default="ours",
        choices=REFERENCE_PREPROCESS, help="FID: ours (center crop + resize) or authors (cv2 bilinear to 256 x 256)",
    )  # fmt: skip
    p.add_argument("--ref-stats", default=None, help="FID reference statistics .npz: read, or written from --ref-dir")
    p.add_argument("--ref-embeddings", default=None, help="CMMD reference embeddings .npz: read, or written")
    p.add_argument("--prompts", default=None, help=f"JSON prompts for CLIP score (default: <images>/{PROMPTS})")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth (FID)")
    p.add_argument("--clip-model", default=CLIP_MODEL, help="CLIP for the CLIP score: hub id or local folder")
    p.add_argument("--cmmd-model", default=CMMD_MODEL, help="CLIP for CMMD: hub id or local folder")
    p.add_argument(
        "--resolution", type=non_negative_int, default=256, help="FID: center-crop and resize to this first (0: off)"
    )
    p.add_argument("--cmmd-estimator", choices=["biased", "unbiased"], default="biased", help="biased: CMMD's code")
    p.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip", help="unreadable images")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--num-workers", type=non_negative_int, default=4, help="DataLoader workers reading the images")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="metrics JSON file (default: <images>/metrics.json)")
    return p.parse_args(argv)


def select_metrics(args: argparse.Namespace, prompts: Path) -> list[str]:
    """The metrics to compute; each one asked for must have its inputs."""
    refs = bool(args.ref_dir or args.coco30k)
    has = {
        "fid": refs or bool(args.ref_stats),
        "clip": bool(args.prompts) or prompts.is_file(),
        "cmmd": refs or bool(args.ref_embeddings),
    }
    needs = {
        "fid": "--ref-dir or --ref-stats (or --coco30k)",
        "clip": f"--prompts or a {PROMPTS} in the image folder",
        "cmmd": "--ref-dir or --ref-embeddings (or --coco30k)",
    }
    if args.metrics is None:
        chosen = [m for m in METRICS if has[m]]
        if not chosen:
            raise UserError("nothing to evaluate: " + "; ".join(f"{NAMES[m]} needs {needs[m]}" for m in METRICS))
        return chosen
    for m in args.metrics:
        if not has[m]:
            raise UserError(f"--metrics {m}: {NAMES[m]} needs {needs[m]}")
    return list(dict.fromkeys(args.metrics))


def reference(
    what: str,
    cache: Path,
    flag: str,
    ref_files: list[Path] | None,
    identity: dict[str, Any],
    compute: Callable[[list[Path]], tuple[dict[str, np.ndarray], dict[str, Any]]],
    log: Callable[[str], None],
    problem: Callable[[dict[str, np.ndarray]], str | None] = lambda arrays: None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays describing the reference set: read from ``cache`` when it was made with the same ``identity`` (model,
    mode, ...) and, given reference files, from the same files; otherwise computed from ``ref_files`` and saved.
    ``problem(arrays)`` says what makes a file's arrays unusable (missing, misshapen, non-finite): a cache that
    the reference files can rebuild is rebuilt with a note; a file given alone is a one-line error."""
    if ref_files is None:
        arrays, meta = load_npz(cache, flag)
        why = problem(arrays)
        if why is not None:
            raise UserError(f"{flag} {cache}: {why} (recompute it with --ref-dir)")
        for key, value in identity.items():
            if key not in meta:
                log(f"{what}: {cache} does not record its {key}; assuming {value!r}")
            elif meta[key] != value:
                recorded = str(meta[key])[:120]
                raise UserError(f"{flag} {cache} was made with another {key} ({recorded}): recompute it with --ref-dir")
        return arrays, meta
    fingerprint = files_fingerprint(ref_files)
    if cache.is_file():
        try:
            arrays, meta = load_npz(cache, flag)
            why = problem(arrays)
        except UserError as e:
            arrays, meta, why = {}, {}, f"unreadable: {e}"
        if why is not None:
            log(f"note: {what}: {cache} is not usable ({why}); recomputing it")
        elif meta.get("fingerprint") == fingerprint and all(meta.get(k) == v for k, v in identity.items()):
            log(f"{what}: read from {cache}")
            return arrays, meta
        else:
            log(f"{what}: {cache} was made from other files or with another model; recomputing it")
    arrays, meta = compute(ref_files)
    meta = {**identity, **meta, "source": str(ref_files[0].parent.resolve()), "fingerprint": fingerprint}
    save_npz(cache, arrays, meta)
    log(f"{what} of {meta['num_images']} images in {meta['source']} written to {cache}")
    return arrays, meta


class AuthorsFidTransform:
    """An image as the authors' scripts fed it to clean-fid: the whole image resized to ``size`` x ``size`` with
    cv2.resize's bilinear arithmetic, then clean-fid's ``legacy_pytorch`` input (``FidTransform``)."""

    def __init__(self, size: int):
        self.size, self.fid = size, FidTransform(None)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.fid(resize_like_cv2(np.asarray(to_rgb8(img)), self.size, self.size))


def stats_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What makes FID reference statistics unusable, or None: mu [D] and sigma [D, D], finite."""
    if "mu" not in arrays or "sigma" not in arrays:
        return f"expected arrays mu and sigma, found {', '.join(arrays) or 'none'}"
    mu, sigma = arrays["mu"], arrays["sigma"]
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        return f"mu/sigma are {mu.dtype}/{sigma.dtype}, expected numbers"
    if mu.ndim != 1 or len(mu) == 0 or sigma.shape != (len(mu), len(mu)):
        return f"mu {list(mu.shape)} and sigma {list(sigma.shape)} are not a mean [D] and a covariance [D, D]"
    for name, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():
            return f"{name} holds NaN or inf values"
    return None


def embeddings_problem(arrays: dict[str, np.ndarray]) -> str | None:
    """What makes CMMD reference embeddings unusable, or None: [N >= 1, D], finite."""
    if "embeddings" not in arrays:
        return f"expected an array 'embeddings', found {', '.join(arrays) or 'none'}"
    e = arrays["embeddings"]
    if not np.issubdtype(e.dtype, np.number) or e.ndim != 2 or len(e) == 0 or e.shape[1] == 0:
        return f"embeddings are {e.dtype} {list(e.shape)}, expected numbers [N, D]"
    if not np.isfinite(e).all():
        return "embeddings hold NaN or inf values"
    return None


def reference_files(args: argparse.Namespace) -> tuple[list[Path] | None, str]:
    """The reference image files (``--ref-dir``'s, or the COCO-30k images), and a name for their cache files."""
    if args.coco30k:
        count = args.max_samples or COCO30K_SIZE
        table = coco30k(args.coco30k, count)
        return [Path(p) for p in table.paths], "coco30k" if count == COCO30K_SIZE else f"coco30k-{count}"
    if args.ref_dir:
        return list_images(args.ref_dir, "--ref-dir"), Path(args.ref_dir).resolve().name
    return None, ""


def skipped_note(what: str, skipped: dict[str, str], log: Callable[[str], None]) -> None:
    if skipped:
        first = next(iter(skipped.items()))
        log(f"{what}: skipped {len(skipped)} unreadable image(s), first {first[0]} ({first[1]})")


def at_least(n: int, count: int, what: str) -> None:
    if count < n:
        raise UserError(f"{what}: {count} readable image(s), need at least {n}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0 or args.resolution < 0:
        raise UserError("--batch-size must be positive, --num-workers and --resolution not negative")
    if args.ref_dir and args.coco30k:
        raise UserError("--ref-dir and --coco30k both name the reference images: give one")
    if args.max_samples is not None and (not args.coco30k or args.max_samples < 1):
        raise UserError("--max-samples takes a positive count, and applies only with --coco30k")
    authors = args.reference_preprocess == "authors"
    if authors and not args.resolution:
        raise UserError("--reference-preprocess authors resizes to --resolution: it cannot be 0")
    folder = Path(args.images)
    files = list_images(folder, "image folder")
    prompts_file = Path(args.prompts) if args.prompts else folder / PROMPTS
    chosen = select_metrics(args, prompts_file)
    prompts = load_prompts(prompts_file, files) if "clip" in chosen else None
    caches = (("fid", "--ref-stats", args.ref_stats), ("cmmd", "--ref-embeddings", args.ref_embeddings))
    for metric, flag, path in caches:
        if metric in chosen and not (args.ref_dir or args.coco30k) and not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist (--ref-dir or --coco30k computes it)")
    ref_files, ref_name = reference_files(args)
    ref_flag = f"--coco30k {args.coco30k}" if args.coco30k else f"--ref-dir {args.ref_dir}"
    out = Path(args.out) if args.out else folder / "metrics.json"
    device = str(resolve_device(args.device))
    if device.startswith("cuda"):  # full fp32: the features feed a covariance and small kernel differences
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    log = get_logger("aptp.evaluate", rank=0).info
    log(f"{len(files)} images in {folder}; computing {', '.join(NAMES[m] for m in chosen)} on {device}")
    read = dict(batch_size=args.batch_size, num_workers=args.num_workers, strict=args.on_bad_image == "fail")
    skipped: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}

    if "fid" in chosen:
        feature_fn, extractor = inception_extractor(args.inception_weights, device)
        resolution = args.resolution or None
        identity = {"mode": FID_MODE, "extractor": extractor, "resolution": resolution}
        identity["preprocess"] = args.reference_preprocess
        transform = AuthorsFidTransform(args.resolution) if authors else FidTransform(resolution)

        def fid_features(files: list[Path], desc: str) -> Features:
            return extract_features(files, transform, feature_fn, desc=desc, **read)

        def fid_stats(ref: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            feats = fid_features(ref, desc="Inception (reference)")
            skipped_note("FID reference", feats.skipped, log)
            at_least(2, len(feats.values), ref_flag)
            mu, sigma = activation_statistics(feats.values)
            return {"mu": mu, "sigma": sigma}, {"num_images": len(feats.values), "skipped": len(feats.skipped)}

        suffix = "-authors" if authors else ""
        cache = Path(args.ref_stats) if args.ref_stats else out.parent / f"fid-reference-{ref_name}{suffix}.npz"
        ref, ref_meta = reference(
            "FID reference statistics", cache, "--ref-stats", ref_files, identity, fid_stats, log, stats_problem
        )
        if "mu" not in ref or "sigma" not in ref:
            raise UserError(f"--ref-stats {cache}: expected arrays mu and sigma, found {', '.join(ref) or 'none'}")
        feats = fid_features(files, desc="Inception")
        skipped.update(feats.skipped)
        at_least(2, len(feats.values), f"image folder {folder}")
        mu, sigma = activation_statistics(feats.values)
        try:
            value = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        except ValueError as e:
            raise UserError(f"--ref-stats {cache}: {e}") from None
        results["fid"] = {
            "value": value, "num_images": len(feats.values), "num_reference": ref_meta.get("num_images"),
            "reference": str(cache), "model": f"Inception-v3 (clean-fid {FID_MODE})", "resolution": resolution,
            "preprocess": args.reference_preprocess,
        }  # fmt: skip
        del feature_fn

    if "clip" in chosen:
        model, processor = load_clip(args.clip_model, device, "--clip-model")
        feats = clip_image_embeddings(files, model, processor, desc="CLIP images", **read)
        skipped.update(feats.skipped)
        at_least(1, len(feats.values), f"image folder {folder}")
        text = clip_text_embeddings([prompts[i] for i in feats.kept], model, processor, args.batch_size)
        results["clip"] = {
            "value": clip_score(feats.values, text), "num_images": len(feats.values),
            "prompts": str(prompts_file), "model": args.clip_model,
        }  # fmt: skip
        del model

    if "cmmd" in chosen:
        from .data import encoder_fingerprint

        model, processor = load_clip(args.cmmd_model, device, "--cmmd-model")
        unbiased = args.cmmd_estimator == "unbiased"
        need = 2 if unbiased else 1

        def embeddings(ref: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            feats = clip_image_embeddings(ref, model, processor, desc="CLIP images (reference)", **read)
            skipped_note("CMMD reference", feats.skipped, log)
            at_least(need, len(feats.values), ref_flag)
            return {"embeddings": feats.values}, {"num_images": len(feats.values), "skipped": len(feats.skipped)}

        cache = Path(args.ref_embeddings) if args.ref_embeddings else out.parent / f"cmmd-reference-{ref_name}.npz"
        identity = {"model": encoder_fingerprint(args.cmmd_model)}
        ref, ref_meta = reference(
            "CMMD reference embeddings",
            cache,
            "--ref-embeddings",
            ref_files,
            identity,
            embeddings,
            log,
            embeddings_problem,
        )
        if "embeddings" not in ref:
            raise UserError(f"--ref-embeddings {cache}: expected an array 'embeddings', found {', '.join(ref)}")
        feats = clip_image_embeddings(files, model, processor, desc="CLIP images", **read)
        skipped.update(feats.skipped)
        at_least(need, len(feats.values), f"image folder {folder}")
        if ref["embeddings"].ndim != 2 or ref["embeddings"].shape[1] != feats.values.shape[1]:
            raise UserError(
                f"--ref-embeddings {cache}: embeddings of shape {ref['embeddings'].shape}, expected [N, "
                f"{feats.values.shape[1]}] from {args.cmmd_model}"
            )
        results["cmmd"] = {
            "value": cmmd(ref["embeddings"], feats.values, unbiased, device), "num_images": len(feats.values),
            "num_reference": len(ref["embeddings"]), "reference": str(cache), "model": args.cmmd_model,
            "sigma": CMMD_SIGMA, "scale": CMMD_SCALE, "estimator": args.cmmd_estimator,
        }  # fmt: skip
        del model

    skipped_note(str(folder), skipped, log)
    report = {"images": str(folder.resolve()), "num_files": len(files), "skipped": skipped, **results}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, report)
    print(markdown_table(results))
    print(f"metrics written to {out}")
    return report


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| metric | value | images | model |", "|---|---:|---:|---|"]
    for m, r in results.items():
        rows.append(f"| {NAMES[m]} | {r['value']:.4f} | {r['num_images']} | {r['model']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    run(main)
