"""Captioned images for APTP: Conceptual Captions and MS-COCO 2014, transforms, CLIP tokens, prompt embeddings.

Layouts, as the datasets are distributed:

- CC3M: ``<root>/Train_GCC-training.tsv`` and ``<root>/Validation_GCC-1.1.0-Validation.tsv`` (``caption \\t url``,
  no header); images in ``<root>/training/`` and ``<root>/validation/`` named ``<row>_<hash>`` (row: the 0-based
  line of the TSV; with or without an extension), matched by the row prefix.
- COCO 2014: ``<root>/annotations/captions_{train,val}2014.json`` and
  ``<root>/images/{split}2014/COCO_{split}2014_%012d.jpg``; one row per caption.

A caption whose image file does not exist is dropped when the table is built (counted in ``missing``). An empty
caption is kept (it is the empty prompt) and counted in ``empty``: a line on stdout says how many and which rows,
and ``on_empty="fail"`` (``data.on_empty``) refuses them. An image that cannot be decoded is skipped when it is read:
the item comes from the next readable row instead (so batches keep their size on every process) and names the
unreadable one, for the training loop to report and count. Images of any mode are read as 8-bit RGB by
``diffcompress.data.to_rgb8`` (16-bit scaled, not clipped; float images refused with the file named).

Text files are UTF-8 (a BOM is allowed); a TSV line that is not is refused with the file, the line and the byte
offset named. TSV rows are split on ``\\n`` only (a stray ``\\r`` inside a caption does not shift the rows).

Prompt embeddings (the router's input) are computed once for a whole caption table and cached in a ``.npy`` file
keyed by the encoder and the captions; every process memory-maps the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from diffcompress.data import ON_EMPTY, to_rgb8
from diffcompress.errors import DataError, UserError

CC3M_SPLITS = {
    "train": ("Train_GCC-training.tsv", "training"),
    "validation": ("Validation_GCC-1.1.0-Validation.tsv", "validation"),
}
COCO_SPLITS = {"train": "train", "validation": "val", "val": "val"}
COCO30K_SIZE, COCO30K_SEED = 30_000, 42
METADATA_SUFFIXES = (".json", ".txt", ".parquet")  # what image downloaders write beside the images
MAX_CONSECUTIVE_UNREADABLE = 100


class StringArray:
    """Many strings in two numpy arrays (UTF-8 bytes and offsets).

    Millions of Python strings would be copied page by page into every DataLoader worker as their reference
    counts change; two arrays stay shared.
    """

    def __init__(self, strings: Iterable[str]):
        encoded = [s.encode() for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.array([len(b) for b in encoded], dtype=np.int64), out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode()

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, indices: Sequence[int]) -> StringArray:
        return StringArray(self[int(i)] for i in indices)


@dataclass(frozen=True)
class CaptionTable:
    """Rows of (image file, caption) whose image file exists."""

    paths: StringArray
    captions: StringArray
    ids: np.ndarray  # int64: the TSV row (CC3M) or the annotation id (COCO)
    missing: int  # caption rows dropped because their image file does not exist
    source: str  # what the rows came from, for messages
    empty: int = 0  # rows (of the table it was taken from) whose caption is empty

    def __len__(self) -> int:
        return len(self.captions)

    def take(self, indices: Sequence[int]) -> CaptionTable:
        """The rows at ``indices``, in that order."""
        ids = self.ids[np.asarray(indices, dtype=np.int64)]
        return CaptionTable(
            self.paths.take(indices), self.captions.take(indices), ids, self.missing, self.source, self.empty
        )


def _table(
    rows: list[tuple[int, str, str | None]], total: int, source: str, on_empty: str = "report", what: str = "row"
) -> CaptionTable:
    """A table of the (id, caption, path) rows that have a path; ``total`` caption rows were read. Empty captions
    are counted and reported in one line (rank 0), or refused with ``on_empty="fail"``."""
    kept = [r for r in rows if r[2] is not None]
    if not kept:
        raise UserError(f"{source}: none of its {total} captions has an image file")
    empty = [r[0] for r in kept if not r[1]]
    if empty:
        examples = ", ".join(str(i) for i in empty[:5]) + (", ..." if len(empty) > 5 else "")
        line = f"{source}: {len(empty)} of its {len(kept)} captions with an image are empty ({what} {examples})"
        if on_empty == "fail":
            raise UserError(f"{line}: refused (data.on_empty=fail); fill them in or pass data.on_empty=report")
        if _distributed()[0] == 0:
            print(f"note: {line}; they are kept as the empty prompt (data.on_empty=fail refuses them)", flush=True)
    return CaptionTable(
        paths=StringArray(r[2] for r in kept),
        captions=StringArray(r[1] for r in kept),
        ids=np.array([r[0] for r in kept], dtype=np.int64),
        missing=total - len(kept),
        source=source,
        empty=len(empty),
    )


def _check_on_empty(on_empty: str) -> None:
    if on_empty not in ON_EMPTY:
        raise UserError(f"data.on_empty={on_empty!r}: expected one of {', '.join(ON_EMPTY)}")


def _tsv_captions(tsv: Path) -> list[str]:
    """The first field of every line of a CC3M TSV, stripped: lines split on ``\\n`` only, decoded as UTF-8 (a BOM
    is allowed); a line that is not UTF-8 is refused with the file, the line and the byte offset named."""
    captions, offset = [], 0
    with open(tsv, "rb") as f:
        for row, raw in enumerate(f):
            body = raw[3:] if row == 0 and raw.startswith(b"\xef\xbb\xbf") else raw
            try:
                line = body.decode("utf-8")
            except UnicodeDecodeError as e:
                at = offset + (len(raw) - len(body)) + e.start
                raise DataError(
                    f"{str(tsv)!r}: line {row + 1} (row {row}) is not UTF-8: byte 0x{body[e.start]:02x} at offset "
                    f"{at} of the file ({e.reason}); expected a UTF-8 TSV (caption \\t url), e.g. re-encode it with "
                    f"iconv -f latin1 -t utf-8"
                ) from None
            captions.append(line.rstrip("\n").split("\t", 1)[0].strip())
            offset += len(raw)
    return captions


def load_cc3m(root: str | os.PathLike, split: str = "train", on_empty: str = "report") -> CaptionTable:
    """Conceptual Captions: TSV rows matched to image files by their row-number prefix."""
    _check_on_empty(on_empty)
    if split not in CC3M_SPLITS:
        raise UserError(f"CC3M split {split!r}: expected one of {', '.join(CC3M_SPLITS)}")
    tsv_name, folder = CC3M_SPLITS[split]
    tsv, image_dir = Path(root) / tsv_name, Path(root) / folder
    for path in (tsv, image_dir):
        if not path.exists():
            raise FileNotFoundError(f"CC3M {split}: {str(path)!r} does not exist (expected {tsv_name} and {folder}/)")
    files: dict[int, str] = {}
    with os.scandir(image_dir) as it:
        for entry in it:
            m = re.match(r"(\d+)_", entry.name)
            if m and not entry.name.endswith(METADATA_SUFFIXES):
                files.setdefault(int(m.group(1)), entry.name)
    rows = []
    for row, caption in enumerate(_tsv_captions(tsv)):
        name = files.get(row)
        rows.append((row, caption, str(image_dir / name) if name else None))
    return _table(rows, len(rows), f"CC3M {split} ({tsv})", on_empty, "rows")


def load_coco(root: str | os.PathLike, split: str = "train", on_empty: str = "report") -> CaptionTable:
    """MS-COCO 2014 captions, one row per caption, in the annotation file's order."""
    _check_on_empty(on_empty)
    if split not in COCO_SPLITS:
        raise UserError(f"COCO split {split!r}: expected one of {', '.join(COCO_SPLITS)}")
    s = COCO_SPLITS[split]
    ann, image_dir = Path(root) / "annotations" / f"captions_{s}2014.json", Path(root) / "images" / f"{s}2014"
    for path in (ann, image_dir):
        if not path.exists():
            raise FileNotFoundError(
                f"COCO {s}2014: {str(path)!r} does not exist (expected annotations/captions_{s}2014.json and "
                f"images/{s}2014/)"
            )
    try:
        annotations = json.loads(ann.read_text(encoding="utf-8"))["annotations"]
        if not isinstance(annotations, list):
            raise TypeError(f"'annotations' is a {type(annotations).__name__}, expected a list")
    except (ValueError, KeyError, TypeError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        reason = f"no key {e}" if isinstance(e, KeyError) else str(e)
        raise UserError(f"{str(ann)!r} is not a COCO captions file ({type(e).__name__}: {reason})") from None
    present = set(os.listdir(image_dir))
    rows = []
    for k, a in enumerate(annotations):
        ok = isinstance(a, dict) and isinstance(a.get("caption"), str)
        ok = ok and all(isinstance(a.get(key), int) and not isinstance(a.get(key), bool) for key in ("id", "image_id"))
        if not ok:
            raise UserError(
                f"{str(ann)!r}: annotation {k} is {str(a)[:80]}: expected an object with an integer id and image_id "
                f"and a string caption"
            )
        name = f"COCO_{s}2014_{a['image_id']:012d}.jpg"
        rows.append((a["id"], a["caption"].strip(), str(image_dir / name) if name in present else None))
    return _table(rows, len(rows), f"COCO {s}2014 ({ann})", on_empty, "annotation ids")


def coco30k(root: str | os.PathLike, count: int = COCO30K_SIZE, seed: int = COCO30K_SEED) -> CaptionTable:
    """The COCO-30k evaluation prompts: ``count`` distinct val2014 images, each with its first caption (in the
    annotation file's order), drawn as ``pandas.DataFrame.sample(n=count, random_state=seed)`` draws them."""
    table = load_coco(root, "val")
    first: dict[str, int] = {}
    for i in range(len(table)):
        first.setdefault(table.paths[i], i)
    if count > len(first):
        raise UserError(f"COCO-{count}: {table.source} has only {len(first)} images with captions")
    rows = np.fromiter(first.values(), dtype=np.int64)
    return table.take(rows[np.random.RandomState(seed).choice(len(rows), count, replace=False)])


# How the authors prepared both FID sets: their generation script resizes each 768 px image to 256 with cv2.resize
# (default interpolation INTER_LINEAR), and resize_and_save_images.py --size 256 256 makes the 256 x 256 references.
# What that script resizes with is not recorded; we assume the same call, cv2.resize to 256 x 256 of the whole
# image (aspect ratio not kept, no crop). "ours": short side to 256 (bicubic), centre crop.
REFERENCE_PREPROCESS = ("ours", "authors")
_CV2_COEF_BITS = 11  # cv2's INTER_RESIZE_COEF_BITS: 8-bit images are resized in fixed point, weights out of 2048


def _cv2_linear_taps(src: int, dst: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index along one axis: the two source indices and their integer weights (summing to 2048), as
    cv2's INTER_LINEAR computes them: source coordinate ``(d + 0.5) * scale - 0.5`` in float32, its floor and
    fraction. Outside the image cv2 clamps differently per axis: horizontally the coordinate itself (the edge pixel
    gets all the weight; ``clamp_weights``), vertically only the row indices (the weights stay)."""
    scale = 1.0 / (dst / src)  # cv2: scale_x = 1 / inv_scale_x, inv_scale_x = dsize / ssize (doubles)
    pos = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    lo = np.floor(pos).astype(np.int64)
    frac = (pos - lo.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        frac[lo < 0], lo[lo < 0] = 0, 0
        frac[lo >= src - 1], lo[lo >= src - 1] = 0, src - 1
    one = 1 << _CV2_COEF_BITS
    # saturate_cast<short>(float) rounds half to even, as np.rint does
    w = np.stack([np.rint((np.float32(1) - frac) * one), np.rint(frac * one)], axis=1).astype(np.int64)
    return np.clip(lo, 0, src - 1), np.clip(lo + 1, 0, src - 1), w


def resize_like_cv2(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(pixels, (width, height))`` (default INTER_LINEAR) of a uint8 ``[H, W]`` or ``[H, W, C]`` image,
    in numpy (opencv is not a dependency).

    cv2's 8-bit arithmetic: a horizontal pass with integer weights out of 2048 (``_cv2_linear_taps``), then a
    vertical one as ``((((S0 >> 4) * b0) >> 16) + (((S1 >> 4) * b1) >> 16) + 2) >> 2`` (S: the horizontal sums of
    the two rows, b: their weights); a downscale by exactly 2 on both axes is INTER_AREA in cv2, ``(sum of the 2 x 2
    block + 2) >> 2``. An integer factor such as SD2.1's 768 -> 256 puts all the weight on one pixel: every 3rd
    pixel from the 2nd. Checked equal, pixel for pixel, to opencv-python-headless 4.10.0.84 on random images of
    400 random sizes (1-89 px, 1/3/4 channels, up and down) and on 768 -> 256 and COCO-like sizes -> 256.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"resize_like_cv2 takes a uint8 [H, W] or [H, W, C] image, got {pixels.dtype} {pixels.shape}")
    h, w = pixels.shape[:2]
    if (w, h) == (2 * width, 2 * height):
        blocks = pixels.astype(np.int32).reshape(height, 2, width, 2, *pixels.shape[2:]).sum(axis=(1, 3))
        return ((blocks + 2) >> 2).astype(np.uint8)
    x0, x1, wx = _cv2_linear_taps(w, width, clamp_weights=True)
    y0, y1, wy = _cv2_linear_taps(h, height, clamp_weights=False)
    channels = (1,) * (pixels.ndim - 2)  # weights broadcast over the channels
    src = pixels.astype(np.int64)
    a0, a1 = (wx[:, i].reshape(-1, *channels) for i in (0, 1))
    rows = src[:, x0] * a0 + src[:, x1] * a1  # [H, width(, C)], at most 255 * 2048
    b0, b1 = (wy[:, i].reshape(-1, 1, *channels) for i in (0, 1))
    out = ((((rows[y0] >> 4) * b0) >> 16) + (((rows[y1] >> 4) * b1) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def load_captions(
    dataset_name: str,
    root: str | os.PathLike,
    split: str = "train",
    max_samples: int | None = None,
    on_empty: str = "report",
) -> CaptionTable:
    """The caption table of ``dataset_name`` (cc3m | coco); ``max_samples`` keeps the first rows; ``on_empty``:
    report empty captions (kept as the empty prompt) or fail."""
    loaders = {"cc3m": load_cc3m, "coco": load_coco}
    if dataset_name not in loaders:
        raise UserError(f"dataset {dataset_name!r}: expected one of {', '.join(loaders)}")
    table = loaders[dataset_name](root, split, on_empty)
    if max_samples is not None and max_samples < len(table):
        table = table.take(range(max_samples))
    return table


# ---------------------------------------------------------------------------------------------------------------
# Images and tokens


class ImageTransform:
    """Resize the short side (bilinear, antialiased), center crop, scale to [-1, 1]: torchvision's Resize,
    CenterCrop, ToTensor and Normalize(0.5, 0.5) on PIL images, without importing torchvision (seconds in every
    process of a launch). The training flip is ``random_flip``, drawn inside the step so that it is seeded with it."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __call__(self, img: Image.Image, path: str | os.PathLike | None = None) -> torch.Tensor:
        r, (w, h) = self.resolution, img.size
        size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
        img = to_rgb8(img, path).resize(size, Image.BILINEAR)
        left, top = int(round((size[0] - r) / 2)), int(round((size[1] - r) / 2))
        img = img.crop((left, top, left + r, top + r))
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(127.5).sub(1)


def random_flip(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image [B, C, H, W] mirrored left-right with probability 1/2 (RandomHorizontalFlip after the crop)."""
    flip = torch.rand(len(pixels), generator=generator) < 0.5
    return torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(-1), pixels)


def tokenize(tokenizer: Any, captions: str | Sequence[str]) -> torch.Tensor:
    """CLIP token ids [N, 77] (the tokenizer's max length), padded and truncated."""
    return tokenizer(
        captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids


class CaptionedImages(torch.utils.data.Dataset):
    """Items ``{index, pixel_values, unreadable}`` plus ``input_ids`` (with a tokenizer) and ``prompt_embeds``
    (with embeddings [N, d]). ``index`` is the row actually used; ``unreadable`` lists ``(row, reason)`` of the
    rows skipped to reach it."""

    def __init__(
        self,
        table: CaptionTable,
        resolution: int,
        tokenizer: Any = None,
        embeddings: np.ndarray | None = None,
    ):
        if embeddings is not None and len(embeddings) != len(table):
            raise ValueError(f"{len(embeddings)} prompt embeddings for {len(table)} captions")
        self.table, self.tokenizer, self.embeddings = table, tokenizer, embeddings
        self.transform = ImageTransform(resolution)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        unreadable = []
        for i in (int(index + k) % len(self) for k in range(MAX_CONSECUTIVE_UNREADABLE)):
            path = self.table.paths[i]
            try:
                with Image.open(path) as img:
                    pixels = self.transform(img, path)
            except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError...
                unreadable.append((i, f"{path}: {type(e).__name__}: {next(iter(str(e).splitlines()), '')}"))
                continue
            item = {"index": i, "pixel_values": pixels, "unreadable": unreadable}
            if self.tokenizer is not None:
                item["input_ids"] = tokenize(self.tokenizer, self.table.captions[i])[0]
            if self.embeddings is not None:
                item["prompt_embeds"] = torch.from_numpy(np.array(self.embeddings[i], dtype=np.float32))
            return item
        raise DataError(  # one line naming the file, also from a DataLoader worker
            f"{self.table.source}: {MAX_CONSECUTIVE_UNREADABLE} consecutive images from row {index} cannot be read "
            f"(first: {unreadable[0][1]})"
        )


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tensors of the items; concatenate their ``unreadable`` lists."""
    batch: dict[str, Any] = {"index": torch.tensor([it["index"] for it in items], dtype=torch.long)}
    for key in ("pixel_values", "input_ids", "prompt_embeds"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    batch["unreadable"] = [u for it in items for u in it["unreadable"]]
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Prompt embeddings, computed once and cached


def encoder_fingerprint(encoder: str) -> str:
    """What identifies an encoder: a local folder by its path and its files' sizes and times; else the hub id."""
    folder = Path(encoder).expanduser()
    if not folder.is_dir():
        return encoder
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    stats = [(f.relative_to(folder).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return json.dumps([str(folder.resolve()), stats])


def embedding_cache_path(cache_dir: str | os.PathLike, encoder: str, captions: StringArray) -> Path:
    digest = hashlib.sha256(encoder_fingerprint(encoder).encode())
    digest.update(captions.offsets.tobytes())
    digest.update(captions.data.tobytes())
    return Path(cache_dir) / f"prompt-embeddings-{digest.hexdigest()[:20]}.npy"


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _cache_ok(path: Path, rows: int) -> bool:
    """Whether a cached embeddings file reads as float32 [rows, d]; when not, it is said and computed again."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        ok = isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.ndim == 2 and len(arr) == rows
        got = f"{getattr(arr, 'dtype', 'an .npz archive')} {list(getattr(arr, 'shape', []))}"
        why = "" if ok else f"{got}, expected float32 [{rows}, d]"
    except (ValueError, OSError, EOFError) as e:
        ok, why = False, f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')}"
    if not ok:
        print(f"note: the prompt embeddings cache {str(path)!r} is unreadable ({why}): computing it again", flush=True)
    return ok


def prompt_embeddings(
    captions: StringArray,
    encoder: str,
    cache_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> np.ndarray:
    """Sentence embeddings [N, d] (float32, memory-mapped) of ``captions``, computed once and cached.

    Under torch.distributed each process embeds a contiguous share and rank 0 joins them, so ``cache_dir`` must
    be visible to every process (as the output folder is). The encoder is only loaded when the cache misses.
    """
    path = embedding_cache_path(cache_dir, encoder, captions)
    rank, world = _distributed()
    # Rank 0 decides for all (every process takes the same branch, whatever its view of the file system) and names
    # this run's temporary files: two runs sharing the cache (a job array) must not join or delete each other's parts.
    decision = [path.is_file() and _cache_ok(path, len(captions)), uuid.uuid4().hex[:12]]
    if world > 1:
        dist.broadcast_object_list(decision, src=0)
    exists, token = decision
    if not exists:
        from .router import PromptEncoder

        path.parent.mkdir(parents=True, exist_ok=True)
        lo, hi = rank * len(captions) // world, (rank + 1) * len(captions) // world
        model = PromptEncoder(encoder, device)
        part = model.embed([captions[i] for i in range(lo, hi)], batch_size, progress=rank == 0).cpu().numpy()
        part_file = path.with_name(f".{path.stem}.{token}.part{rank}.npy")
        np.save(part_file, part)
        if world > 1:
            dist.barrier()
        if rank == 0:
            tmp = path.with_name(f".{path.name}.{token}.tmp")
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(captions), model.dim))
            for r in range(world):
                r_file = path.with_name(f".{path.stem}.{token}.part{r}.npy")
                if not r_file.is_file():  # written on another node, to a folder this one does not see
                    raise UserError(
                        f"{path.parent}: the prompt embeddings of process {r} are missing; the cache folder must be on "
                        f"a file system that every node shares (data.embedding_cache_dir)"
                    )
                out[r * len(captions) // world : (r + 1) * len(captions) // world] = np.load(r_file)
                r_file.unlink()
            out.flush()
            del out
            os.replace(tmp, path)
        if world > 1:
            dist.barrier()
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"prompt embeddings cache {str(path)!r} cannot be read ({type(e).__name__}: {e})") from None
