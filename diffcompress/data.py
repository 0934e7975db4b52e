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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoint import write_json_atomic
from .vae import HUB_VAES

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MANIFEST = "manifest.json"


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM/DiT center crop: BOX-halve while the short side is >= 2x the target, BICUBIC-resize the short
    side to ``image_size``, then crop the middle square. Returns uint8 ``[image_size, image_size, 3]``."""
    pil_image = pil_image.convert("RGB")
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
    (class, relative path), so an image's index is the same on every rank and every re-run.

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
        rel, labels = [], []
        for label, name in enumerate(self.classes):
            found = []
            for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                base = Path(dirpath).relative_to(root).as_posix()
                found += [f"{base}/{f}" for f in filenames if f.lower().endswith(IMG_EXTENSIONS)]
            found.sort()  # same class prefix, so this sorts by the path relative to the class folder
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
                return i, to_model_range(center_crop_arr(img, self.image_size)), label, ""
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
    file = Path(path) / MANIFEST
    return json.loads(file.read_text()) if file.is_file() else None


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
    raise ValueError(f"features file {str(file)!r} has shape {list(shape)}: expected [2,C,H,W] or [C,H,W]")


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
        self.views, self.latent_shape = _views(np.load(first, mmap_mode="r").shape, first)

    def _init_packed(self) -> None:
        self.features = np.load(self.path / "features.npy", mmap_mode="r")
        label_file = self.path / "labels.npy"
        if not label_file.is_file():
            raise FileNotFoundError(f"{str(self.path / 'features.npy')!r} has no labels.npy beside it")
        self.labels = np.load(label_file).astype(np.int64).reshape(-1)
        if self.features.ndim != 5:
            raise ValueError(f"{str(self.path / 'features.npy')!r} has shape {list(self.features.shape)}: "
                             f"expected [N, V, C, H, W]")  # fmt: skip
        if len(self.features) != len(self.labels):
            raise ValueError(
                f"packed features in {str(self.path)!r} do not match: {len(self.features)} features, "
                f"{len(self.labels)} labels"
            )
        self.views, self.latent_shape = self.features.shape[1], tuple(self.features.shape[2:])

    def __len__(self) -> int:
        return len(self.stems) if self.layout == "files" else len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.layout == "packed":
            return torch.from_numpy(np.array(self.features[i], dtype=np.float32)), int(self.labels[i])
        file = self._feat_file(i)
        x = np.load(file)
        views, shape = _views(x.shape, file)
        if (views, shape) != (self.views, self.latent_shape):
            raise ValueError(
                f"features file {str(file)!r} has {views} view(s) of {list(shape)}, "
                f"the others {self.views} of {list(self.latent_shape)}"
            )
        return torch.from_numpy(x.astype(np.float32, copy=False).reshape(views, *shape)), self._label(i)

    def _feat_file(self, i: int) -> Path:
        return self._feat_dir / f"{self.stems[i]}.npy"

    def _label(self, i: int) -> int:
        file = self._label_dir / f"{self.stems[i]}.npy"
        y = np.load(file)
        if y.size != 1:
            raise ValueError(f"labels file {str(file)!r} holds {y.size} values, expected one")
        return int(y.reshape(-1)[0])

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
    """The training scripts' feature set, checked against their ``--image-size`` and ``--num-classes``."""
    dataset = FeatureDataset(path)
    latent = dataset.latent_shape[1]
    if image_size is not None and latent not in (image_size, image_size // 8):
        raise ValueError(f"--image-size {image_size} does not fit the {latent}x{latent} features in {path}")
    if dataset.num_classes > num_classes:
        raise ValueError(f"{path} has {dataset.num_classes} classes, more than --num-classes {num_classes}")
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
