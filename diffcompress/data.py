"""Images in, latents out: the ADM center crop, an ImageNet-style folder index, and the extracted features.

Features come in two layouts, read by the same ``FeatureDataset``:

- ``files`` (what ``extract_features.py`` writes, and the original repositories): ``imagenet256_features/{i}.npy``
  holding ``[2, C, H, W]`` (original, h-flipped) and ``imagenet256_labels/{i}.npy`` holding ``[label]``.
- ``packed`` (``pack_features``): ``features.npy`` ``[N, V, C, H, W]`` (memory-mapped) and ``labels.npy`` ``[N]``;
  one file instead of a million, which shared filesystems prefer.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import write_json_atomic
from .errors import DataError, UserError
from .vae import HUB_VAES

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MANIFEST = "manifest.json"
ON_EMPTY = ("report", "fail")  # an empty class folder (or caption): count it and say so, or refuse the input


def to_rgb8(img: Image.Image, path: str | os.PathLike | None = None) -> Image.Image:
    """Any PIL image as 8-bit RGB, the one conversion every image reader uses (``path`` names it in errors).

    ``Image.convert("RGB")`` clips 16-bit pixels to 255 (a white image): here 16-bit gray (modes ``I;16*``, and
    ``I``, which Pillow uses for 16-bit PGM/PPM and TIFF) keeps its top 8 bits, ``v >> 8``, the same mapping Pillow
    applies to 16-bit RGB(A) PNGs, so a 16-bit image whose values are ``v8 * 257`` (or ``v8 * 256``) gives exactly
    the pixels of the 8-bit image. Refused with the file named (``DataError``): ``I`` pixels outside 0..65535 and
    32-bit float images (mode ``F``: no standard range). Alpha is dropped, as torchvision's and DiT's loaders drop
    it (the stored colour stays); palette, 1-bit, CMYK and YCbCr images convert as Pillow converts them."""
    where = f"image {str(path)!r}" if path is not None else "an image"
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "I" or mode.startswith("I;16"):
        arr = np.asarray(img)
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise DataError(
                f"{where} has 32-bit integer pixels in {lo}..{hi}: expected 8-bit or 16-bit values (0..65535); "
                f"save it as an 8- or 16-bit image"
            )
        return Image.fromarray((arr.astype(np.uint32) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise DataError(
            f"{where} has 32-bit float pixels (mode F), which have no standard range: expected 8- or 16-bit "
            f"integer pixels; save it as an 8- or 16-bit image"
        )
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what Pillow asks for; the colours are the same
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise DataError(f"{where}: its mode {mode} cannot be converted to RGB ({e})") from None


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM/DiT center crop: BOX-halve while the short side is >= 2x the target, BICUBIC-resize the short
    side to ``image_size``, then crop the middle square. Returns uint8 ``[image_size, image_size, 3]``."""
    pil_image = to_rgb8(pil_image)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # writable, so torch.from_numpy does not warn
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top : top + image_size, left : left + image_size])


def to_model_range(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``HxWx3`` -> float ``3xHxW`` in [-1, 1], computed as DiT does (ToTensor, Normalize(0.5, 0.5))."""
    return (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - 0.5) / 0.5


# ------------------------------------------------------------------------------------------ images


class ImageFolderIndex:
    """``root/<class>/**/<image>``: classes are the sorted folder names (labels 0..K-1), samples sorted by
    (class, relative path), so an image's index is the same on every rank and every re-run. A class folder without
    images keeps its label (the labels of the others must not shift): ``empty_classes`` lists them, for the script
    to report or refuse (``empty_classes_line``).

    Paths and labels live in numpy arrays, not lists of Python objects: DataLoader workers forked from a
    process holding 1.28M ``Path`` objects would each end up copying them (reference counts touch the pages).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist (expected root/<class>/<images>)")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"image folder {str(root)!r} has no class folders (expected root/<class>/<images>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        rel, labels, self.empty_classes = [], [], []
        for label, name in enumerate(self.classes):
            found = []
            for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                base = Path(dirpath).relative_to(root).as_posix()
                found += [f"{base}/{f}" for f in filenames if f.lower().endswith(IMG_EXTENSIONS)]
            found.sort()  # same class prefix, so this sorts by the path relative to the class folder
            if not found:
                self.empty_classes.append(name)
            rel += found
            labels += [label] * len(found)
        if not rel:
            raise ValueError(
                f"image folder {str(root)!r} has {len(self.classes)} class folders but no images "
                f"({', '.join(IMG_EXTENSIONS)})"
            )
        self._rel = np.array([r.encode() for r in rel])  # fixed-width bytes: one buffer, no per-item objects
        self.labels = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._rel)

    def __getitem__(self, index: int) -> tuple[Path, int]:
        return self.root / self._rel[index].decode(), int(self.labels[index])

    def empty_classes_line(self, on_empty: str = "report", flag: str = "--on-empty") -> str | None:
        """The line reporting the empty class folders (None when there are none); ``on_empty="fail"`` raises it."""
        if not self.empty_classes:
            return None
        n, examples = len(self.empty_classes), ", ".join(self.empty_classes[:3])
        what = f"{n} of the {len(self.classes)} class folders of {str(self.root)!r} hold no images (e.g. {examples})"
        if on_empty == "fail":
            raise UserError(f"{what}: refused ({flag} fail); add their images, remove them, or pass {flag} report")
        return f"note: {what}; their labels stay reserved, with 0 samples ({flag} fail refuses this)"

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """All (path, label) pairs, in index order (a new list: convenient for small folders)."""
        return [self[i] for i in range(len(self))]


class CroppedImages(torch.utils.data.Dataset):
    """The images at ``indices`` of an ``ImageFolderIndex``, center-cropped and scaled to [-1, 1].

    An unreadable image never raises inside a DataLoader worker (that would kill the whole loader): the item
    comes back with ``image=None`` and the error text, and ``collate_images`` sets it aside.
    """

    def __init__(self, index: ImageFolderIndex, indices: Sequence[int], image_size: int):
        self.index, self.indices, self.image_size = index, np.asarray(indices, dtype=np.int64), image_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None, int, str]:
        i = int(self.indices[k])
        path, label = self.index[i]
        try:
            with Image.open(path) as img:
                return i, to_model_range(center_crop_arr(to_rgb8(img, path), self.image_size)), label, ""
        except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError...
            return i, None, label, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def collate_images(batch: list[tuple[int, torch.Tensor | None, int, str]]) -> dict[str, Any]:
    """Stack the readable images; list the failed ones as (index, error)."""
    ok = [b for b in batch if b[1] is not None]
    return {
        "index": torch.tensor([b[0] for b in ok], dtype=torch.long),
        "image": torch.stack([b[1] for b in ok]) if ok else torch.empty(0),
        "label": torch.tensor([b[2] for b in ok], dtype=torch.long),
        "failed": [(b[0], b[3]) for b in batch if b[1] is None],
    }


# ---------------------------------------------------------------------------------------- features


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """``path/manifest.json`` (None when there is none); a file that is not a JSON object is a ``DataError``."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{str(file)!r} is not valid JSON ({e}): fix or delete it") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{str(file)!r} holds a {type(manifest).__name__}, expected a JSON object")
    return manifest


def load_npy(file: str | os.PathLike, what: str, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of one ``.npy`` array, no pickles; any failure is a ``DataError`` naming ``what`` and the file."""
    try:
        arr = np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{what} {str(file)!r} does not exist") from None
    except (ValueError, OSError, EOFError, pickle.UnpicklingError) as e:
        reason = next(iter(str(e).splitlines()), "")
        raise DataError(f"{what} {str(file)!r} is not a readable .npy array ({type(e).__name__}: {reason})") from None
    if not isinstance(arr, np.ndarray):  # np.load opens an .npz archive whatever its name
        arr.close()
        raise DataError(f"{what} {str(file)!r} is an .npz archive, expected one .npy array")
    return arr


def check_labels(labels: np.ndarray, file: str | os.PathLike, bound: tuple[int, str] | None = None) -> np.ndarray:
    """Class labels as int64, or a ``DataError`` naming ``file``.

    Integer arrays are taken as they are; float arrays only when every value is a whole number (``3.0`` is class 3:
    some tools save labels as floats), never truncated (``3.7`` is refused, as are NaN and other dtypes). Every label
    must be >= 0 and, with ``bound = (num_classes, where that number comes from)``, < num_classes: a label equal to
    ``num_classes`` would silently be DiT's null (unconditional) class, a larger one an index error."""
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        whole = np.isfinite(labels) & (labels == np.round(labels))
        if not whole.all():
            bad = labels[~whole].reshape(-1)[0]
            raise DataError(f"labels file {str(file)!r} holds {bad!r}: expected integer class labels")
    elif labels.dtype.kind not in "iu":
        raise DataError(f"labels file {str(file)!r} holds {labels.dtype} values: expected integer class labels")
    out = labels.astype(np.int64)
    if out.size:
        lo, hi = int(out.min()), int(out.max())
        if lo < 0:
            raise DataError(f"labels file {str(file)!r} holds the label {lo}: expected class labels >= 0")
        if bound is not None and hi >= bound[0]:
            raise DataError(f"labels file {str(file)!r} holds the label {hi}: expected 0..{bound[0] - 1} ({bound[1]})")
    return out


def _stem_key(stem: str) -> tuple[int, int | str]:
    return (0, int(stem)) if stem.isdigit() else (1, stem)  # 2 before 10; odd names after the numbers


def _views(shape: tuple[int, ...], file: Path) -> tuple[int, tuple[int, int, int]]:
    """(views, (C, H, W)) of one features file: [2,C,H,W], [1,2,C,H,W], [1,C,H,W] or [C,H,W]."""
    if len(shape) == 5 and shape[0] == 1 and shape[1] in (1, 2):
        shape = shape[1:]
    if len(shape) == 4 and shape[0] in (1, 2):
        return shape[0], shape[1:]
    if len(shape) == 3:
        return 1, shape
    raise DataError(f"features file {str(file)!r} has shape {list(shape)}: expected [2,C,H,W] or [C,H,W]")


def _check_float(arr: np.ndarray, file: Path) -> None:
    if arr.dtype.kind != "f":
        raise DataError(f"features file {str(file)!r} holds {arr.dtype} values: expected float16/32/64 latents")


def _find_file_pair(path: Path, name: str | None) -> tuple[Path, Path] | None:
    """The ``<name>_features`` / ``<name>_labels`` folders of ``path``; None when there are none."""
    names = sorted(d.name[: -len("_features")] for d in path.glob("*_features") if d.is_dir())
    names = [n for n in names if (path / f"{n}_labels").is_dir()]
    if name is not None:
        names = [n for n in names if n == name]
    if not names:
        return None
    if len(names) > 1:
        raise ValueError(
            f"{str(path)!r} holds several feature sets ({', '.join(names)}): choose one with name=, "
            f"e.g. name={names[0]!r}"
        )
    return path / f"{names[0]}_features", path / f"{names[0]}_labels"


class FeatureDataset(torch.utils.data.Dataset):
    """Extracted latents: ``ds[i] -> (float32 [V, C, H, W], label)``, V = 1 or 2 views (original, h-flipped).

    The layout is auto-detected (``packed`` wins when both are present; force one with ``layout=``;
    extract_features.py re-packs when it adds files beside a packed copy, so the two stay equal). The
    dataset never picks a view itself: the training loop does, from its own seeded generator, so resuming
    a run replays exactly the same draws.
    """

    def __init__(self, path: str | os.PathLike, layout: str | None = None, name: str | None = None):
        self.path = path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"features folder {str(path)!r} does not exist (run extract_features.py first)")
        if layout not in (None, "files", "packed"):
            raise ValueError(f"layout must be 'files' or 'packed', got {layout!r}")
        self.manifest = read_manifest(path) or {}
        n = self.manifest.get("num_classes")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
            raise DataError(f"{str(path / MANIFEST)!r}: num_classes is {n!r}, expected a positive integer")
        # labels are checked against this as they are read (open_features sets --num-classes when no manifest does)
        self.label_bound = None if n is None else (n, f"num_classes {n} in {path / MANIFEST}")
        packed = (path / "features.npy").is_file()
        use_packed = layout == "packed" or (layout is None and packed)
        pair = None if use_packed else _find_file_pair(path, name)
        if use_packed and packed:
            self.layout = "packed"
            self._init_packed()
        elif pair is not None:
            self.layout = "files"
            self._init_files(*pair)
        else:
            raise FileNotFoundError(
                f"no features found in {str(path)!r}: expected {path / 'imagenet256_features'}/*.npy with "
                f"{path / 'imagenet256_labels'}/*.npy, or {path / 'features.npy'} (run extract_features.py first)"
            )
        self._num_classes = self.manifest.get("num_classes")

    def _init_files(self, feat_dir: Path, label_dir: Path) -> None:
        feats = {n[:-4] for n in os.listdir(feat_dir) if n.endswith(".npy")}
        labels = {n[:-4] for n in os.listdir(label_dir) if n.endswith(".npy")}
        if not feats and not labels:
            raise ValueError(f"no features found in {str(feat_dir)!r}: the folder has no .npy files")
        if feats != labels:
            no_label = sorted(feats - labels, key=_stem_key)[:3]
            no_feat = sorted(labels - feats, key=_stem_key)[:3]
            raise ValueError(
                f"features and labels do not match in {str(self.path)!r}: {len(feats)} feature files, "
                f"{len(labels)} label files (features without labels, e.g. {no_label}; labels without features, "
                f"e.g. {no_feat})"
            )
        self.stems = np.array(sorted(feats, key=_stem_key))  # numpy, not a list: cheap to share with workers
        self._feat_dir, self._label_dir = feat_dir, label_dir
        first = self._feat_file(0)
        arr = load_npy(first, "features file", mmap_mode="r")
        _check_float(arr, first)
        self.views, self.latent_shape = _views(arr.shape, first)

    def _init_packed(self) -> None:
        feat_file, label_file = self.path / "features.npy", self.path / "labels.npy"
        self.features = load_npy(feat_file, "packed features file", mmap_mode="r")
        if not label_file.is_file():
            raise FileNotFoundError(f"{str(feat_file)!r} has no labels.npy beside it")
        labels = load_npy(label_file, "labels file")
        if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] != 1):
            raise DataError(f"labels file {str(label_file)!r} has shape {list(labels.shape)}: expected [N]")
        self.labels = check_labels(labels.reshape(-1), label_file, self.label_bound)
        if self.features.ndim != 5:
            raise DataError(f"{str(feat_file)!r} has shape {list(self.features.shape)}: expected [N, V, C, H, W]")
        _check_float(self.features, feat_file)
        if len(self.features) != len(self.labels):
            raise ValueError(
                f"packed features in {str(self.path)!r} do not match: {len(self.features)} features, "
                f"{len(self.labels)} labels"
            )
        self.views, self.latent_shape = self.features.shape[1], tuple(self.features.shape[2:])

    def __len__(self) -> int:
        return len(self.stems) if self.layout == "files" else len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """One item; a bad file raises a ``DataError`` naming it (one line, also from a DataLoader worker)."""
        if self.layout == "packed":
            x = np.array(self.features[i], dtype=np.float32)
            if not np.isfinite(x).all():
                raise DataError(f"row {i} of {str(self.path / 'features.npy')!r} holds NaN or infinite values")
            return torch.from_numpy(x), int(self.labels[i])
        file = self._feat_file(i)
        x = load_npy(file, "features file")
        _check_float(x, file)
        views, shape = _views(x.shape, file)
        if (views, shape) != (self.views, self.latent_shape):
            raise DataError(
                f"features file {str(file)!r} has {views} view(s) of {list(shape)}, "
                f"the others {self.views} of {list(self.latent_shape)}"
            )
        x = x.astype(np.float32, copy=False).reshape(views, *shape)
        if not np.isfinite(x).all():
            raise DataError(f"features file {str(file)!r} holds NaN or infinite values")
        return torch.from_numpy(x), self._label(i)

    def describe(self, i: int) -> str:
        """Where sample ``i`` comes from, for a message: its features file, or its row of features.npy."""
        return str(self._feat_file(i)) if self.layout == "files" else f"row {i} of {self.path / 'features.npy'}"

    def _feat_file(self, i: int) -> Path:
        return self._feat_dir / f"{self.stems[i]}.npy"

    def _label(self, i: int) -> int:
        file = self._label_dir / f"{self.stems[i]}.npy"
        y = load_npy(file, "labels file")
        if y.size != 1:
            raise DataError(f"labels file {str(file)!r} holds {y.size} values, expected one")
        return int(check_labels(y.reshape(-1), file, self.label_bound)[0])

    @property
    def num_classes(self) -> int:
        """From the manifest; without one, the largest label + 1 (reads every label file once)."""
        if self._num_classes is None:
            labels = self.labels if self.layout == "packed" else [self._label(i) for i in range(len(self))]
            self._num_classes = int(max(labels)) + 1
        return int(self._num_classes)


def pack_features(
    path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    dtype: str | np.dtype = "float16",
    name: str | None = None,
) -> Path:
    """Convert a per-file feature set into ``out_path/features.npy`` + ``labels.npy`` (default: beside it).

    float16 halves the size and is ample for SD latents; pass ``dtype="float32"`` for a bit-exact copy. Each
    file is written under a temporary name and renamed, so a crash never leaves a half-written array.
    ``name`` picks the set when ``path`` holds several (e.g. "imagenet512" for ``imagenet512_features``).
    """
    src = FeatureDataset(path, layout="files", name=name)
    out = Path(out_path) if out_path is not None else src.path
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    n = len(src)
    tmp_feat = out / f".features.npy.{os.getpid()}.tmp"
    tmp_label = out / f".labels.npy.{os.getpid()}.tmp"
    try:
        arr = np.lib.format.open_memmap(tmp_feat, mode="w+", dtype=dtype, shape=(n, src.views, *src.latent_shape))
        labels = np.empty(n, dtype=np.int64)
        for i in range(n):
            x, labels[i] = src[i]
            arr[i] = x.numpy()
        arr.flush()
        del arr
        with open(tmp_label, "wb") as f:
            np.save(f, labels)
        os.replace(tmp_feat, out / "features.npy")
        os.replace(tmp_label, out / "labels.npy")
    finally:
        tmp_feat.unlink(missing_ok=True)
        tmp_label.unlink(missing_ok=True)
    numeric = all(s.isdigit() for s in src.stems)
    if numeric:  # row -> image index (extraction leaves gaps where images were unreadable)
        tmp_index = out / f".indices.npy.{os.getpid()}.tmp"
        with open(tmp_index, "wb") as f:
            np.save(f, src.stems.astype(np.int64))
        os.replace(tmp_index, out / "indices.npy")
    manifest = dict(src.manifest)
    manifest.update(
        layout="files+packed" if out.resolve() == src.path.resolve() else "packed",
        count=n, views=src.views, latent_shape=list(src.latent_shape), packed_dtype=dtype.name,
        num_classes=manifest.get("num_classes", int(labels.max()) + 1),
        packed_from=str(src.path.resolve()), packed_indices="indices.npy" if numeric else None,
    )  # fmt: skip
    write_json_atomic(out / MANIFEST, manifest)
    return out


def open_features(path: str | os.PathLike, image_size: int | None, num_classes: int) -> FeatureDataset:
    """The training scripts' feature set, checked against their ``--image-size`` and ``--num-classes``: every label
    must be in 0..num_classes-1 (the packed labels here, each label file as it is read)."""
    dataset = FeatureDataset(path)
    latent = dataset.latent_shape[1]
    if image_size is not None and latent not in (image_size, image_size // 8):
        raise ValueError(f"--image-size {image_size} does not fit the {latent}x{latent} features in {path}")
    recorded = dataset.manifest.get("num_classes")
    if recorded is not None and recorded > num_classes:
        raise ValueError(
            f"{dataset.path / MANIFEST} says {recorded} classes, more than --num-classes {num_classes}: pass "
            f"--num-classes {recorded}"
        )
    bound = (num_classes, f"--num-classes {num_classes}")
    if dataset.layout == "packed":
        check_labels(dataset.labels, dataset.path / "labels.npy", bound)
    if dataset.label_bound is None:
        dataset.label_bound = bound  # files without a manifest: each label file is checked as it is read
    return dataset


def _vae_name(spec: str) -> str:
    """One spelling per VAE: hub ids for ema/mse, resolved paths for local folders."""
    if spec in HUB_VAES:
        return HUB_VAES[spec]
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def check_features_vae(spec: str | None, dataset: FeatureDataset) -> None:
    """A training script's ``--vae``: the features must have been encoded with that VAE, when their manifest
    says which (the authors' scripts take the flag but train on latents: it cannot change the training)."""
    if spec is None:
        return
    if spec not in (*HUB_VAES, "none") and not Path(spec).exists() and "/" not in spec:
        raise ValueError(f"--vae {spec}: expected ema, mse, none or a local VAE folder")
    recorded = dataset.manifest.get("vae")
    if recorded is not None and _vae_name(spec) != _vae_name(recorded):
        raise ValueError(
            f"--vae {spec}: the features in {dataset.path} were encoded with --vae {recorded}; "
            f"pass --vae {recorded} or extract them again"
        )
