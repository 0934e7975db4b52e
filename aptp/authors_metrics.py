"""The authors' metrics scripts (``scripts/metrics/*.py``) on our code: what their entry points share.

- ``fid.py`` maps onto ``python -m aptp.evaluate --metrics fid``; its reference, clean-fid custom statistics by
  name (``--dataset coco-30k``), is found where clean-fid's ``make_custom_stats`` writes it (``cleanfid_stats_file``)
  or given as our COCO folder, a reference folder or a statistics file.
- ``clip_features.py`` / ``clip_score.py``: CLIP text features of caption files, one ``.npy`` each, and the CLIP
  score of generated images against them, paired by sorted file order, with our CLIP (``aptp.metrics``: transformers'
  CLIP; the OpenAI model names map to their hub ids, ``clip_source``) and our score (``aptp.metrics.clip_score``).
- ``resize_and_save_images.py`` / ``sample_coco_30k.py``: images as uint8 HWC RGB ``.npy`` arrays resized with
  cv2.resize's bilinear arithmetic (``aptp.data.resize_like_cv2``), and the COCO-30k draw of ``aptp.data.coco30k``,
  the one ``aptp.generate --coco30k`` and ``aptp.evaluate --coco30k`` use.

fid.py and clip_score.py append their result as one line to a text file in ``--result_dir`` and print it
(``append_result``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffcompress.data import to_rgb8
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar

from .data import coco30k, resize_like_cv2
from .metrics import FID_MODE, clip_image_embeddings, clip_score, clip_text_embeddings, list_images, load_clip

# OpenAI's CLIP names (clip.load) -> the transformers copies of the same weights on the hub
OPENAI_CLIP = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
OPENAI_RESNETS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")  # no transformers port
COCO30K_IMAGES, COCO30K_CAPTIONS = Path("images") / "val2014_30k", Path("annotations") / "captions_val2014_30k.json"
AUTHORS_SIZE = 256  # sample_coco_30k.py's image size


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def append_result(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` (the authors' scripts append, so runs accumulate) and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    print(line)
    print(f"appended to {path}")


def save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temporary file and a rename: an interrupted run leaves no partial array."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# FID: the reference the authors' --dataset NAME names


def cleanfid_stats_dir() -> Path:
    """Where clean-fid's ``make_custom_stats`` writes and ``compute_fid(dataset_split="custom")`` reads."""
    import cleanfid

    return Path(cleanfid.__file__).parent / "stats"


def cleanfid_stats_file(name: str, mode: str = FID_MODE) -> Path:
    """The custom statistics file clean-fid keeps for ``name`` (its file name rule, lower-cased)."""
    return cleanfid_stats_dir() / f"{name}_{mode}_custom_na.npz".lower()


def fid_reference_flags(
    dataset: str, coco_dir: str | None, ref_dir: str | None, ref_stats: str | None, num_samples: int | None
) -> tuple[list[str], str]:
    """``aptp.evaluate`` flags for the reference of the authors' ``--dataset``, and a description of it.

    ``--coco30k COCO_DIR``: the COCO-30k images (our draw, the authors' cv2 resize to 256: what their sample_coco_30k.py
    + make_custom_stats made); ``--ref_dir`` / ``--ref_stats``: as given, images as they are (clean-fid resizes them
    itself); none: clean-fid's own custom statistics named ``dataset``, when they exist.
    """
    options = (("--coco30k", coco_dir), ("--ref_dir", ref_dir), ("--ref_stats", ref_stats))
    given = [flag for flag, value in options if value]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} each name the reference: give one")
    if num_samples is not None and not coco_dir:
        raise UserError("--num_samples applies only with --coco30k")
    if coco_dir:
        count = ["--max_samples", str(num_samples)] if num_samples else []
        flags = ["--coco30k", coco_dir, *count, "--reference_preprocess", "authors"]
        return flags, f"COCO-30k of {coco_dir}" + (f" (first {num_samples})" if num_samples else "")
    as_is = ["--resolution", "0"]  # clean-fid reads both folders as they are
    if ref_dir:
        return ["--ref-dir", ref_dir, *as_is], ref_dir
    if ref_stats:
        return ["--ref-stats", ref_stats, *as_is], ref_stats
    stats = cleanfid_stats_file(dataset)
    if stats.is_file():
        return ["--ref-stats", str(stats), *as_is], str(stats)
    hint = "--coco30k COCO_DIR (the COCO 2014 folder: the same draw and resize), " if "coco" in dataset.lower() else ""
    raise UserError(
        f"--dataset {dataset}: clean-fid has no custom statistics {stats}; pass {hint}--ref_dir FOLDER (reference "
        "images) or --ref_stats FILE.npz (mu and sigma)"
    )


# ---------------------------------------------------------------------------------------------------------------
# CLIP: model names, text features, score


def clip_source(name: str) -> str:
    """The transformers source of the authors' ``--clip_model``: an OpenAI name's hub id, else the hub id or local
    folder as given."""
    if name in OPENAI_CLIP:
        return OPENAI_CLIP[name]
    if name in OPENAI_RESNETS:
        raise UserError(
            f"--clip_model {name}: OpenAI's ResNet CLIPs have no transformers weights; use one of "
            f"{', '.join(OPENAI_CLIP)}, a hub id or a local CLIP folder"
        )
    return name


def features_dir_name(name: str) -> str:
    """``ViT-B-32_clip_features`` for ``ViT-B/32`` (the authors' rule), also for its hub id or a local copy named
    like the hub's (``.../clip-vit-base-patch32``); otherwise the model folder's name."""
    by_leaf = {hub.split("/")[-1]: openai for openai, hub in OPENAI_CLIP.items()}
    leaf = Path(name.rstrip("/")).name
    openai = name if name in OPENAI_CLIP else by_leaf.get(leaf)
    return f"{(openai or leaf).replace('/', '-')}_clip_features"


def caption_files(folder: str) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--dataset_path {folder} does not exist or is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
    if not files:
        raise UserError(f"--dataset_path {folder} holds no caption .txt files")
    return files


def write_text_features(
    dataset_path: str, clip_model: str, batch_size: int, device: str, out_dir: str | None = None
) -> Path:
    """One CLIP text feature (projected, not normalised, float32 ``[D]``) per caption file, as ``<stem>.npy`` in
    ``<dataset_path>/../<model>_clip_features/`` (or ``out_dir``)."""
    files = caption_files(dataset_path)
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"caption file {f}: cannot be read as UTF-8 text ({e})") from None
    out = Path(out_dir) if out_dir else Path(dataset_path).resolve().parent / features_dir_name(clip_model)
    model, processor = load_clip(clip_source(clip_model), device, "--clip_model")
    features = clip_text_embeddings(texts, model, processor, batch_size)
    out.mkdir(parents=True, exist_ok=True)
    for f, row in zip(files, features):
        save_npy(out / f"{f.stem}.npy", row.astype(np.float32))
    print(f"{len(files)} CLIP text features ({clip_model}, {features.shape[1]}-d) written to {out}")
    return out


def read_text_features(folder: str) -> tuple[list[Path], np.ndarray]:
    """The ``.npy`` features of ``folder`` in sorted file order, as ``[N, D]``."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--text_features_dir {folder} does not exist or is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".npy")
    if not files:
        raise UserError(f"--text_features_dir {folder} holds no .npy feature files")
    rows = []
    for f in files:
        try:
            row = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"text feature {f}: not a readable .npy array ({e})") from None
        if row.ndim not in (1, 2) or row.size != row.shape[-1] or row.dtype.kind not in "fiu":
            raise UserError(f"text feature {f}: expected one numeric vector, got {row.dtype} {row.shape}")
        rows.append(row.reshape(-1).astype(np.float64))
    if len({len(r) for r in rows}) > 1:
        lengths = sorted({len(r) for r in rows})
        raise UserError(f"--text_features_dir {folder}: features of different lengths ({lengths})")
    return files, np.stack(rows)


def clip_score_of_folders(
    gen_dir: str, features_dir: str, clip_model: str, batch_size: int, num_workers: int, device: str
) -> tuple[float, int]:
    """The CLIP score (``aptp.metrics.clip_score``) of the images of ``gen_dir`` against the text features of
    ``features_dir``, the i-th image in sorted name order with the i-th feature file; and the number of pairs."""
    images = sorted(list_images(gen_dir, "--gen_images_dir"), key=lambda p: p.name)
    feature_files, text = read_text_features(features_dir)
    if len(images) != len(feature_files):
        raise UserError(
            f"--gen_images_dir {gen_dir} holds {len(images)} images and --text_features_dir {features_dir} "
            f"{len(feature_files)} features: they are paired by sorted file order, so the counts must match"
        )
    if differ := [(i.name, t.name) for i, t in zip(images, feature_files) if i.stem != t.stem]:
        note(f"{len(differ)} image(s) paired with a feature of another name by sorted order (first: {differ[0][0]} "
             f"with {differ[0][1]})")  # fmt: skip
    model, processor = load_clip(clip_source(clip_model), device, "--clip_model")
    feats = clip_image_embeddings(images, model, processor, batch_size, num_workers, desc="CLIP images")
    if feats.skipped:
        name, why = next(iter(feats.skipped.items()))
        raise UserError(f"cannot read image {Path(gen_dir) / name} ({why}): every image is paired by its position")
    if feats.values.shape[1] != text.shape[1]:
        raise UserError(
            f"--text_features_dir {features_dir}: {text.shape[1]}-d features, and --clip_model {clip_model} gives "
            f"{feats.values.shape[1]}-d image features: compute the text features with the same model"
        )
    value = clip_score(feats.values, text)
    cos = np.sum(_unit(feats.values) * _unit(text), axis=1)
    if (cos < 0).any():
        note(f"{int((cos < 0).sum())} pair(s) have a negative cosine, counted as 0 as in aptp.evaluate (the plain mean "
             f"of 100 * cos would be {float(np.mean(100 * cos)):.4f})")  # fmt: skip
    return value, len(images)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# Resized images as .npy


def resize_to_npy(
    sources: Sequence[str | os.PathLike],
    names: Sequence[str],
    out_dir: Path,
    width: int,
    height: int,
    skip_existing: bool,
) -> tuple[int, dict[str, str]]:
    """``out_dir/<name>.npy``: each source image as RGB, resized to ``width`` x ``height`` with cv2.resize's bilinear
    arithmetic, uint8 ``[height, width, 3]``. Returns the number written and the unreadable files (path -> why)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written, unreadable = 0, {}
    for src, name in progress_bar(list(zip(sources, names)), desc="resizing", unit="image"):
        target = out_dir / f"{name}.npy"
        if skip_existing and target.exists():
            continue
        try:
            with Image.open(src) as img:
                pixels = np.asarray(to_rgb8(img, src))
        except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError...
            unreadable[str(src)] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        save_npy(target, resize_like_cv2(pixels, width, height))
        written += 1
    return written, unreadable


def report_unreadable(unreadable: dict[str, str]) -> None:
    if unreadable:
        path, why = next(iter(unreadable.items()))
        note(f"skipped {len(unreadable)} unreadable image(s), first {path} ({why})")


def resize_folder(data_dir: str, output_dir: str, width: int, height: int) -> int:
    """Every image directly in ``data_dir`` as ``output_dir/<stem>.npy`` (``resize_to_npy``)."""
    files = list_images(data_dir, "--data_dir")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems:
            raise UserError(f"--data_dir {data_dir}: {stems[f.stem].name} and {f.name} would both be {f.stem}.npy")
        stems[f.stem] = f
    written, unreadable = resize_to_npy(files, list(stems), Path(output_dir), width, height, skip_existing=False)
    report_unreadable(unreadable)
    print(f"{written} images resized to {width} x {height} and saved as .npy in {output_dir}")
    return written


def sample_coco30k(data_dir: str, seed: int, num_samples: int, log: Callable[[str], Any] = print) -> Path:
    """The COCO-30k draw (``aptp.data.coco30k``) as the authors' sample_coco_30k.py lays it out: the images resized to
    256 x 256 in ``images/val2014_30k/<stem>.npy`` and their captions, one per image in draw order, in
    ``annotations/captions_val2014_30k.json`` (COCO's caption format: ``images`` and ``annotations``)."""
    table = coco30k(data_dir, num_samples, seed)
    root = Path(data_dir)
    out, captions = root / COCO30K_IMAGES, root / COCO30K_CAPTIONS
    stems = [Path(p).stem for p in table.paths]
    _, unreadable = resize_to_npy(list(table.paths), stems, out, AUTHORS_SIZE, AUTHORS_SIZE, skip_existing=True)
    report_unreadable(unreadable)
    images, annotations = [], []
    for stem, caption, ann_id in zip(stems, table.captions, table.ids):
        image_id = int(stem.rsplit("_", 1)[-1])  # COCO_val2014_<12-digit id>
        images.append({"id": image_id, "file_name": f"{stem}.npy"})
        annotations.append({"image_id": image_id, "id": int(ann_id), "caption": caption})
    tmp = captions.with_name(f".{captions.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": annotations}))
    os.replace(tmp, captions)
    extra = {p.stem for p in out.glob("*.npy")} - set(stems)
    if extra:
        note(f"{out} also holds {len(extra)} .npy file(s) outside this draw (an earlier --seed or --num_samples?): "
             "remove them before computing statistics of the folder")  # fmt: skip
    done = sum((out / f"{s}.npy").exists() for s in stems)
    log(f"COCO-{len(table)} (seed {seed}): {done} images in {out}, captions in {captions}")
    return out
