"""APTP's image metrics: FID (clean-fid, legacy_pytorch), CLIP score and CMMD of a folder of generated images.

- FID: clean-fid's ``legacy_pytorch`` mode (a PyTorch bilinear resize to 299, then pytorch-fid's FID Inception-v3)
  against custom reference statistics: ``mu`` and ``sigma`` of a reference folder, computed once and saved as an
  ``.npz`` with a ``meta`` record (mode, feature extractor, source files), the names clean-fid's own statistics
  files use. clean-fid downloads its Inception weights from a URL; ``inception_extractor`` gives it a local file
  instead (or downloads it once into the cache ``evaluator.py`` shares). The Frechet distance itself is
  ``diffcompress.fid_metrics.frechet_distance``.
- CLIP score: ``100 * max(cos(E_image, E_caption), 0)`` averaged over images, with the projected embeddings of
  CLIP ViT-B/32; captions are truncated to the text tower's 77 positions. (torchmetrics' ``CLIPScore`` clips the
  mean instead of each score; the two agree whenever no cosine is negative, as with real CLIP models and captions.)
- CMMD (Jayasumana et al., "Rethinking FID", 2024): squared maximum mean discrepancy between the L2-normalised CLIP
  ViT-L/14-336 image embeddings of two sets, with the Gaussian RBF kernel ``exp(-|x - y|^2 / (2 sigma^2))``,
  sigma = 10, times 1000. The paper states the unbiased estimator; its reference code, which produced the published
  numbers, averages the kernel over all pairs including i = j (the biased estimator). ``mmd`` defaults to the
  biased estimator for comparable numbers; ``unbiased=True`` leaves out the i = j terms.

Images are read in batches by a DataLoader; a file that cannot be read is left out and reported (or raises with
``strict``), never ends a worker.

    files = list_images("samples/")
    feature_fn, extractor = inception_extractor("pt_inception-2015-12-05-6726825d.pth", "cuda")
    mu, sigma = activation_statistics(fid_features(files, feature_fn).values)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffcompress.data import IMG_EXTENSIONS, center_crop_arr, to_rgb8
from diffcompress.errors import UserError
from diffcompress.progress import progress_bar

from .router import _first_line, _hub_reachable

FID_MODE = "legacy_pytorch"
CLIP_MODEL = "openai/clip-vit-base-patch32"
CMMD_MODEL = "openai/clip-vit-large-patch14-336"
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Image folders


def _natural_key(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


NPY = ".npy"  # the authors' image arrays (uint8 [H, W, 3]; clean-fid reads them too)


def open_image(path: Path) -> Image.Image:
    """An image file, or one of the authors' ``.npy`` arrays (uint8 [H, W, 3] or [H, W]), as a PIL image."""
    if path.suffix.lower() != NPY:
        return Image.open(path)
    array = np.load(path, allow_pickle=False)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ValueError(f"expected a uint8 [H, W, 3] image array, got {array.dtype} {list(array.shape)}")
    return Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1 else array)


def list_images(folder: str | os.PathLike, what: str = "image folder") -> list[Path]:
    """Image files directly in ``folder`` in natural name order (``2.png`` before ``10.png``): the usual image
    suffixes, the authors' ``.npy`` image arrays, and files without a suffix (CC3M's downloader names its images
    ``<row>_<hash>``)."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{what} {str(root)!r} does not exist or is not a folder")
    files = [
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and (p.suffix == "" or p.suffix.lower() in (*IMG_EXTENSIONS, NPY))
    ]
    if not files:
        raise UserError(f"{what} {str(root)!r} has no images ({', '.join(IMG_EXTENSIONS)}, {NPY} or no suffix)")
    return sorted(files, key=lambda p: _natural_key(p.name))


def files_fingerprint(files: Sequence[Path]) -> str:
    """Names, sizes and modification times of ``files``: tells whether a cached reference is still current."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_prompts(path: str | os.PathLike, files: Sequence[Path]) -> list[str]:
    """The prompt of each of ``files``. ``path`` holds a JSON list (the i-th prompt belongs to the i-th file, in
    ``list_images`` order) or a JSON object mapping file names to prompts (generation's ``prompts.json``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"prompts file {str(path)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"prompts file {str(path)!r} is not JSON ({_first_line(e)})") from None
    names = [f.name for f in files]
    folder = str(files[0].parent) if files else "the image folder"
    if isinstance(data, list):
        if len(data) != len(names):
            raise UserError(f"prompts file {str(path)!r} has {len(data)} prompts for {len(names)} images in {folder}")
        prompts = data
    elif isinstance(data, dict):
        missing = [n for n in names if n not in data]
        if missing:
            raise UserError(
                f"prompts file {str(path)!r} has no prompt for {len(missing)} of the {len(names)} images in {folder} "
                f"(first: {missing[0]})"
            )
        extra = sorted(set(data) - set(names), key=_natural_key)
        if extra:
            raise UserError(
                f"prompts file {str(path)!r} has {len(data)} prompts for {len(names)} images in {folder}: "
                f"{len(extra)} name no image there (first: {extra[0]})"
            )
        prompts = [data[n] for n in names]
    else:
        raise UserError(
            f"prompts file {str(path)!r} holds a JSON {type(data).__name__}; expected a list of prompts or an object "
            f"mapping image file names to prompts"
        )
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise UserError(f"prompts file {str(path)!r}: the prompt of {names[bad]} is not a string")
    return prompts


class ImageFiles(torch.utils.data.Dataset):
    """``(index, transform(RGB image), "")`` per file, or ``(index, None, reason)`` for a file that cannot be read:
    an exception inside a DataLoader worker would end the whole loader."""

    def __init__(self, files: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]):
        self.files, self.transform = list(files), transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            with open_image(self.files[i]) as img:
                return i, self.transform(to_rgb8(img, self.files[i])), ""
        except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, SyntaxError...
            return i, None, f"{type(e).__name__}: {_first_line(e)}"


@dataclass
class Features:
    """Per-image features of the readable files, in file order."""

    values: np.ndarray  # [N, D] float32
    kept: list[int]  # index in the file list of each row
    skipped: dict[str, str] = field(default_factory=dict)  # file name -> why it could not be read


@torch.no_grad()
def extract_features(
    files: Sequence[Path],
    transform: Callable[[Image.Image], torch.Tensor],
    embed: FeatureFn,
    batch_size: int = 64,
    num_workers: int = 0,
    strict: bool = False,
    desc: str = "features",
) -> Features:
    """``embed`` of the stacked ``transform``-ed images, batch by batch. An unreadable file is skipped and listed
    in ``Features.skipped``, or raises a UserError when ``strict``."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(files, transform), batch_size=batch_size, num_workers=num_workers, collate_fn=list
    )
    values, kept, skipped = [], [], {}
    for batch in progress_bar(loader, desc=desc, unit="batch"):
        for i, x, reason in batch:
            if x is None and strict:
                raise UserError(f"cannot read image {files[i]} ({reason}); --on-bad-image skip leaves such files out")
            if x is None:
                skipped[files[i].name] = reason
        ok = [(i, x) for i, x, _ in batch if x is not None]
        if ok:
            kept += [i for i, _ in ok]
            values.append(embed(torch.stack([x for _, x in ok])).float().cpu().numpy())
    width = values[0].shape[1] if values else 0
    return Features(np.concatenate(values) if values else np.zeros((0, width), np.float32), kept, skipped)


# ---------------------------------------------------------------------------------------------------------------
# FID: clean-fid's legacy_pytorch features


class FidTransform:
    """An image as clean-fid's ``legacy_pytorch`` mode feeds it to Inception: float ``[3, 299, 299]`` in [0, 255]
    after a PyTorch bilinear resize. With ``resolution`` the image is first center-cropped and resized to that
    square (``center_crop_arr``; a no-op for images already that size)."""

    def __init__(self, resolution: int | None = None):
        self.resolution = resolution
        self._resize = None  # built on first use, so the transform pickles into DataLoader workers

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self._resize is None:
            from cleanfid.resize import build_resizer

            with warnings.catch_warnings():  # building it otherwise silences every warning of the process
                self._resize = build_resizer(FID_MODE)
        arr = center_crop_arr(img, self.resolution) if self.resolution else np.array(img)
        # clean-fid's ResizeDataset: the resizer returns float32 HWC in [0, 255], which ToTensor only transposes
        return torch.from_numpy(np.ascontiguousarray(self._resize(arr).transpose(2, 0, 1), dtype=np.float32))


def inception_extractor(weights: str | os.PathLike | None, device: str | torch.device = "cpu") -> tuple[FeatureFn, str]:
    """clean-fid's ``legacy_pytorch`` feature function (float ``[N, 3, 299, 299]`` in [0, 255] -> ``[N, 2048]``) with
    the Inception weights of ``weights``, and a string identifying it (mode and weight digest).

    Without ``weights``: torch hub's copy, where clean-fid itself keeps it, else the diffcompress cache, else a
    download there (online only); otherwise an error naming the URL and ``--inception-weights``.
    """
    from cleanfid import features, inception_pytorch

    from diffcompress.checkpoint import load_file
    from diffcompress.downloads import fetch_weights, file_digest
    from diffcompress.inception import WEIGHTS_FILE, WEIGHTS_URL

    if weights is None:
        hub_copy = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
        weights = hub_copy if hub_copy.is_file() else None
    path = fetch_weights(weights, WEIGHTS_FILE, WEIGHTS_URL, "FID Inception weights", "--inception-weights")
    state_dict = load_file(path)
    download = inception_pytorch.load_state_dict_from_url  # clean-fid's only source of weights: give it ours
    inception_pytorch.load_state_dict_from_url = lambda url, **kwargs: state_dict
    try:
        with warnings.catch_warnings():  # torchvision's notice about clean-fid's `pretrained=False`
            warnings.simplefilter("ignore", UserWarning)
            model_fn = features.build_feature_extractor(FID_MODE, torch.device(device), use_dataparallel=False)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped keys
        raise UserError(
            f"--inception-weights {path}: not the FID Inception-v3 weights {WEIGHTS_FILE} "
            f"({_first_line(e).rstrip(':')})"
        ) from None
    finally:
        inception_pytorch.load_state_dict_from_url = download
    return lambda x: model_fn(x.to(device)), f"{FID_MODE} inception {file_digest(path)}"


def fid_features(
    files: Sequence[Path],
    feature_fn: FeatureFn,
    resolution: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    strict: bool = False,
    desc: str = "Inception",
) -> Features:
    """Inception features of ``files`` as clean-fid's ``legacy_pytorch`` mode computes them (``FidTransform``)."""
    return extract_features(files, FidTransform(resolution), feature_fn, batch_size, num_workers, strict, desc)


# ---------------------------------------------------------------------------------------------------------------
# CLIP models, embeddings and CLIP score


def load_clip(name_or_path: str, device: str | torch.device = "cpu", flag: str = "--clip-model") -> tuple[Any, Any]:
    """A frozen transformers ``CLIPModel`` and its ``CLIPProcessor`` from a local folder, the hub cache or (online
    only) the hub. Offline, a hub id that is not cached is a one-line UserError saying what to download and that
    ``flag`` takes the folder."""
    from transformers import CLIPModel, CLIPProcessor

    def load(source: str, local_only: bool) -> tuple[Any, Any]:
        model = CLIPModel.from_pretrained(source, local_files_only=local_only)
        return model, CLIPProcessor.from_pretrained(source, local_files_only=local_only)

    local = Path(name_or_path).expanduser()
    try:
        if local.exists():
            model, processor = load(str(local), True)
        else:
            try:
                model, processor = load(name_or_path, True)
            except OSError:  # not in the hub cache
                if not _hub_reachable():
                    folder = f"models/{name_or_path.split('/')[-1]}"
                    raise UserError(
                        f"CLIP model {name_or_path!r} ({flag}) is neither a local folder nor in the hub cache, and the "
                        f"hub cannot be reached. On a machine with network run `hf download "
                        f"{name_or_path} --local-dir {folder}`, copy that folder here and pass {flag} {folder}"
                    ) from None
                model, processor = load(name_or_path, False)
    except UserError:
        raise
    except Exception as e:  # a folder that is not a CLIP model, a corrupt download, an unknown hub id
        raise UserError(
            f"{flag} {name_or_path!r}: could not load a CLIP model and processor ({type(e).__name__}: "
            f"{_first_line(e)}); expected a transformers CLIP folder (config, weights, tokenizer, preprocessor)"
        ) from None
    return model.eval().requires_grad_(False).to(device), processor


def _projected(out: Any) -> torch.Tensor:
    """The projected embedding: transformers 5 returns it as a model output's ``pooler_output``, 4.x as a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipTransform:
    """An image as the CLIP image processor prepares it: ``pixel_values`` ``[3, S, S]``."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]


def clip_image_embeddings(
    files: Sequence[Path],
    model: Any,
    processor: Any,
    batch_size: int = 64,
    num_workers: int = 0,
    strict: bool = False,
    desc: str = "CLIP images",
) -> Features:
    """Projected CLIP image embeddings (not normalised) of ``files``."""
    device = next(model.parameters()).device

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return _projected(model.get_image_features(pixel_values=pixels.to(device)))

    transform = ClipTransform(processor.image_processor)
    return extract_features(files, transform, embed, batch_size, num_workers, strict, desc)


@torch.no_grad()
def clip_text_embeddings(
    texts: Sequence[str], model: Any, processor: Any, batch_size: int = 64, desc: str = "CLIP text"
) -> np.ndarray:
    """Projected CLIP text embeddings ``[N, D]`` (not normalised); texts longer than the text tower's positions
    (77 tokens) are truncated."""
    device = next(model.parameters()).device
    max_length = model.config.text_config.max_position_embeddings
    out = []
    for i in progress_bar(range(0, len(texts), batch_size), desc=desc, unit="batch"):
        tokens = processor.tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        emb = model.get_text_features(
            input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
        )
        out.append(_projected(emb).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.projection_dim), np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clip_score(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Mean over pairs of ``100 * max(cos(image_i, text_i), 0)``; rows of the two arrays are paired."""
    if image_emb.shape != text_emb.shape or len(image_emb) == 0:
        raise ValueError(f"CLIP score needs paired [N > 0, D] embeddings, got {image_emb.shape} and {text_emb.shape}")
    cos = (_unit(image_emb) * _unit(text_emb)).sum(axis=-1)
    return float(np.mean(100 * np.maximum(cos, 0)))


# ---------------------------------------------------------------------------------------------------------------
# CMMD


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, block: int) -> float:
    """Sum of ``exp(-gamma |a_i - b_j|^2)`` over all pairs, ``block`` rows at a time."""
    total = 0.0
    for i in range(0, len(a), block):
        total += torch.exp(-gamma * torch.cdist(a[i : i + block], b).square()).sum().item()
    return total


def mmd(
    x: np.ndarray,
    y: np.ndarray,
    sigma: float = CMMD_SIGMA,
    scale: float = CMMD_SCALE,
    unbiased: bool = False,
    device: str | torch.device = "cpu",
    block: int = 4096,
) -> float:
    """``scale`` times the squared MMD of ``x`` [m, D] and ``y`` [n, D] under ``exp(-|u - v|^2 / (2 sigma^2))``.

    Biased (CMMD's reference code): ``mean k(x, x') + mean k(y, y') - 2 mean k(x, y)`` over all pairs, i = j
    included, so a set against itself gives 0. Unbiased: the within-set means leave out i = j (k = 1 there).
    Computed in float64, ``block`` rows at a time, on ``device``.
    """
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)
    y = torch.as_tensor(np.asarray(y), dtype=torch.float64, device=device)
    m, n = len(x), len(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(m, n) < (2 if unbiased else 1):
        need = "at least 2 rows each" if unbiased else "at least 1 row each"
        raise ValueError(f"MMD needs [m, D] and [n, D] embeddings ({need}), got {tuple(x.shape)} and {tuple(y.shape)}")
    gamma = 1 / (2 * sigma**2)
    k_xx, k_yy, k_xy = (_kernel_sum(a, b, gamma, block) for a, b in ((x, x), (y, y), (x, y)))
    if unbiased:
        within = (k_xx - m) / (m * (m - 1)) + (k_yy - n) / (n * (n - 1))
    else:
        within = k_xx / m**2 + k_yy / n**2
    return scale * (within - 2 * k_xy / (m * n))


def cmmd(ref_emb: np.ndarray, emb: np.ndarray, unbiased: bool = False, device: str | torch.device = "cpu") -> float:
    """CMMD of two sets of CLIP image embeddings: ``mmd`` (sigma 10, times 1000) of the L2-normalised rows."""
    return mmd(_unit(ref_emb), _unit(emb), unbiased=unbiased, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Reference files: arrays and a JSON ``meta`` record in one .npz


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """Write ``arrays`` and ``meta`` (as a JSON string) to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays, meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return path


def load_npz(path: str | os.PathLike, what: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and ``meta`` record of an .npz (``meta`` is empty for a file written elsewhere, e.g. clean-fid's
    statistics files); ``what`` names the file in errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "meta"}
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, json.JSONDecodeError) as e:
        raise UserError(f"{what} {str(path)!r} is not a readable .npz file ({_first_line(e)})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{what} {str(path)!r}: its meta record is a JSON {type(meta).__name__}, expected an object")
    return arrays, meta
