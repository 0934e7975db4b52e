"""Evaluate a folder of generated images: FID, CLIP score and CMMD, printed as a markdown table.

    python -m aptp.evaluate samples/ --ref-dir coco-val-256/ --inception-weights pt_inception-2015-12-05-6726825d.pth
    python -m aptp.evaluate samples/ --metrics clip --clip-model models/clip-vit-base-patch32
    python -m aptp.evaluate samples/ --ref-stats fid-reference.npz --ref-embeddings cmmd-reference.npz

Inputs per metric (without ``--metrics``, every metric whose inputs are given is computed):

- ``fid``: ``--ref-dir`` or ``--ref-stats``. The reference statistics (clean-fid ``legacy_pytorch``) are computed
  from ``--ref-dir`` once and saved to ``--ref-stats`` (default ``<out dir>/fid-reference-<ref dir name>.npz``); a
  later run reads them while the reference files and the Inception weights are unchanged. Both sets are first
  center-cropped and resized to ``--resolution`` (256, as in the paper; 0 keeps them as they are).
- ``clip``: the prompts, ``--prompts`` or the folder's ``prompts.json``: a JSON object mapping image file names to
  prompts, or a JSON list in the images' natural name order (2.png before 10.png).
- ``cmmd``: ``--ref-dir`` or ``--ref-embeddings`` (CLIP embeddings of the reference images, cached like the FID
  statistics, default ``<out dir>/cmmd-reference-<ref dir name>.npz``).

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

from diffcompress.checkpoint import write_json_atomic
from diffcompress.cli import run
from diffcompress.distributed import get_logger
from diffcompress.errors import UserError
from diffcompress.fid_metrics import activation_statistics, frechet_distance

from .metrics import (
    CLIP_MODEL,
    CMMD_MODEL,
    CMMD_SCALE,
    CMMD_SIGMA,
    FID_MODE,
    clip_image_embeddings,
    clip_score,
    clip_text_embeddings,
    cmmd,
    fid_features,
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", help="folder of generated images (PNG/JPG)")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None, help="default: all whose inputs are given")
    p.add_argument("--ref-dir", default=None, help="reference images (FID and CMMD)")
    p.add_argument("--ref-stats", default=None, help="FID reference statistics .npz: read, or written from --ref-dir")
    p.add_argument("--ref-embeddings", default=None, help="CMMD reference embeddings .npz: read, or written")
    p.add_argument("--prompts", default=None, help=f"JSON prompts for CLIP score (default: <images>/{PROMPTS})")
    p.add_argument("--inception-weights", default=None, help="local pt_inception-2015-12-05-6726825d.pth (FID)")
    p.add_argument("--clip-model", default=CLIP_MODEL, help="CLIP for the CLIP score: hub id or local folder")
    p.add_argument("--cmmd-model", default=CMMD_MODEL, help="CLIP for CMMD: hub id or local folder")
    p.add_argument("--resolution", type=int, default=256, help="FID: center-crop and resize to this first (0: off)")
    p.add_argument("--cmmd-estimator", choices=["biased", "unbiased"], default="biased", help="biased: CMMD's code")
    p.add_argument("--on-bad-image", choices=["skip", "fail"], default="skip", help="unreadable images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers reading the images")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="metrics JSON file (default: <images>/metrics.json)")
    return p.parse_args(argv)


def select_metrics(args: argparse.Namespace, prompts: Path) -> list[str]:
    """The metrics to compute; each one asked for must have its inputs."""
    has = {
        "fid": bool(args.ref_dir or args.ref_stats),
        "clip": bool(args.prompts) or prompts.is_file(),
        "cmmd": bool(args.ref_dir or args.ref_embeddings),
    }
    needs = {
        "fid": "--ref-dir or --ref-stats",
        "clip": f"--prompts or a {PROMPTS} in the image folder",
        "cmmd": "--ref-dir or --ref-embeddings",
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
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays describing the reference set: read from ``cache`` when it was made with the same ``identity`` (model,
    mode, ...) and, given reference files, from the same files; otherwise computed from ``ref_files`` and saved."""
    if ref_files is None:
        arrays, meta = load_npz(cache, flag)
        for key, value in identity.items():
            if key not in meta:
                log(f"{what}: {cache} does not record its {key}; assuming {value!r}")
            elif meta[key] != value:
                recorded = str(meta[key])[:120]
                raise UserError(f"{flag} {cache} was made with another {key} ({recorded}): recompute it with --ref-dir")
        return arrays, meta
    fingerprint = files_fingerprint(ref_files)
    if cache.is_file():
        arrays, meta = load_npz(cache, flag)
        if meta.get("fingerprint") == fingerprint and all(meta.get(k) == v for k, v in identity.items()):
            log(f"{what}: read from {cache}")
            return arrays, meta
        log(f"{what}: {cache} was made from other files or with another model; recomputing it")
    arrays, meta = compute(ref_files)
    meta = {**identity, **meta, "source": str(ref_files[0].parent.resolve()), "fingerprint": fingerprint}
    save_npz(cache, arrays, meta)
    log(f"{what} of {meta['num_images']} images in {meta['source']} written to {cache}")
    return arrays, meta


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
    folder = Path(args.images)
    files = list_images(folder, "image folder")
    prompts_file = Path(args.prompts) if args.prompts else folder / PROMPTS
    chosen = select_metrics(args, prompts_file)
    prompts = load_prompts(prompts_file, files) if "clip" in chosen else None
    caches = (("fid", "--ref-stats", args.ref_stats), ("cmmd", "--ref-embeddings", args.ref_embeddings))
    for metric, flag, path in caches:
        if metric in chosen and not args.ref_dir and not Path(path).is_file():
            raise UserError(f"{flag} {path} does not exist (--ref-dir computes it)")
    ref_files = list_images(args.ref_dir, "--ref-dir") if args.ref_dir else None
    out = Path(args.out) if args.out else folder / "metrics.json"
    ref_name = Path(args.ref_dir).resolve().name if args.ref_dir else ""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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

        def fid_stats(ref: list[Path]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
            feats = fid_features(ref, feature_fn, resolution, desc="Inception (reference)", **read)
            skipped_note("FID reference", feats.skipped, log)
            at_least(2, len(feats.values), f"--ref-dir {args.ref_dir}")
            mu, sigma = activation_statistics(feats.values)
            return {"mu": mu, "sigma": sigma}, {"num_images": len(feats.values), "skipped": len(feats.skipped)}

        cache = Path(args.ref_stats) if args.ref_stats else out.parent / f"fid-reference-{ref_name}.npz"
        ref, ref_meta = reference("FID reference statistics", cache, "--ref-stats", ref_files, identity, fid_stats, log)
        if "mu" not in ref or "sigma" not in ref:
            raise UserError(f"--ref-stats {cache}: expected arrays mu and sigma, found {', '.join(ref) or 'none'}")
        feats = fid_features(files, feature_fn, resolution, desc="Inception", **read)
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
            at_least(need, len(feats.values), f"--ref-dir {args.ref_dir}")
            return {"embeddings": feats.values}, {"num_images": len(feats.values), "skipped": len(feats.skipped)}

        cache = Path(args.ref_embeddings) if args.ref_embeddings else out.parent / f"cmmd-reference-{ref_name}.npz"
        identity = {"model": encoder_fingerprint(args.cmmd_model)}
        ref, ref_meta = reference(
            "CMMD reference embeddings", cache, "--ref-embeddings", ref_files, identity, embeddings, log
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
