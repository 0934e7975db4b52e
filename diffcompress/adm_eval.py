"""The ADM evaluation suite over image batches in npz files: activations (cached), statistics and metrics.

A batch file is an ``.npz`` whose ``arr_0`` is uint8 ``[N, H, W, 3]`` (what ``sample_ddp.py`` writes and what the
ADM reference batches hold). Reference batches may also carry precomputed ``mu``/``sigma`` (pool_3) and
``mu_s``/``sigma_s`` (spatial); as in the ADM evaluator they are used for FID/sFID when present.
Images stream from the archive in batches, so a 50K x 256^2 file never sits in memory whole.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from .downloads import cache_dir
from .errors import UserError
from .fid_metrics import activation_statistics, frechet_distance, inception_score, precision_recall
from .progress import progress_bar


class InceptionBackend(Protocol):
    name: str

    def identity(self) -> str: ...

    def activations(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def softmax(self, pool: np.ndarray) -> np.ndarray: ...


def load_backend(name: str, weights: str | None, graph: str | None, device: str) -> InceptionBackend:
    """``torch`` (the ported graph, weights from ``weights`` or the cache) or ``tf`` (the frozen graph itself)."""
    if name == "torch":
        from .inception import TorchInception

        return TorchInception(weights, device)
    if name == "tf":
        from .inception_tf import TFInception

        return TFInception(graph)
    raise UserError(f"--backend {name!r}: choose torch or tf")


class NpzImages:
    """Streams ``arr_0`` of an npz archive (stored or deflated) in batches without loading it whole."""

    def __init__(self, path: str | os.PathLike, key: str = "arr_0"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such batch file")
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = zf.namelist()
                if f"{key}.npy" not in names:
                    keys = ", ".join(n.removesuffix(".npy") for n in names)
                    raise UserError(f"{self.path}: no {key!r} array (it has: {keys})")
                with zf.open(f"{key}.npy") as f:
                    self.shape, self.dtype, self._offset = self._header(f)
        except zipfile.BadZipFile:
            raise UserError(f"{self.path}: not an npz archive (expected np.savez output with {key!r})") from None
        self.key = key
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise UserError(f"{self.path}: {key} must be uint8 [N, H, W, 3], got {self.dtype} {list(self.shape)}")

    @staticmethod
    def _header(f) -> tuple[tuple[int, ...], np.dtype, int]:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran:
            raise UserError("Fortran-ordered arrays are not supported; save with np.savez(np.ascontiguousarray(x))")
        return shape, dtype, f.tell()

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            f.read(self._offset)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                buf = f.read(n * per_image)
                if len(buf) != n * per_image:
                    raise UserError(f"{self.path}: {self.key} is truncated at image {start}")
                yield np.frombuffer(buf, np.uint8).reshape(n, *self.shape[1:])


def _cache_file(path: Path, backend: InceptionBackend, root: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{backend.identity()}"
    return root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def batch_activations(
    path: str | os.PathLike,
    backend: InceptionBackend,
    batch_size: int = 64,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(pool_3, spatial) features of every image in ``path``; with ``cache`` (a folder), reused while the file,
    its modification time and the backend's weights are unchanged."""
    images = NpzImages(path)
    cached = _cache_file(images.path, backend, Path(cache)) if cache is not None else None
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            print(f"reusing activations of {images.path} from {cached}")
            return z["pool"], z["spatial"]
    pools, spatials = [], []
    desc = f"{backend.name} inception: {images.path.name}"
    for batch in progress_bar(
        images.batches(batch_size), total=-(-len(images) // batch_size), desc=desc, disable=not progress
    ):
        pool, spatial = backend.activations(batch)
        pools.append(pool)
        spatials.append(spatial)
    pool, spatial = np.concatenate(pools), np.concatenate(spatials)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.stem + ".tmp.npz")
        np.savez(tmp, pool=pool, spatial=spatial)
        os.replace(tmp, cached)
    return pool, spatial


def reference_statistics(
    path: str | os.PathLike, pool: np.ndarray, spatial: np.ndarray, recompute: bool = False
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
    """Pool and spatial (mu, sigma) of the reference: the file's precomputed ones when present, else computed."""
    with np.load(path) as z:
        keys = set(z.files)
        if not recompute and {"mu", "sigma", "mu_s", "sigma_s"} <= keys:
            return (z["mu"], z["sigma"]), (z["mu_s"], z["sigma_s"]), "precomputed in the reference file"
    return activation_statistics(pool), activation_statistics(spatial), "computed from the reference images"


def evaluate(
    ref: str | os.PathLike,
    sample: str | os.PathLike,
    backend: InceptionBackend,
    batch_size: int = 64,
    cache: str | os.PathLike | None = None,
    recompute_ref_stats: bool = False,
    split_size: int = 5000,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Inception Score, FID, sFID, precision and recall of ``sample`` against ``ref``."""
    NpzImages(ref), NpzImages(sample)  # both readable before any network runs
    ref_pool, ref_spatial = batch_activations(ref, backend, batch_size, cache, progress)
    ref_stats, ref_stats_s, source = reference_statistics(ref, ref_pool, ref_spatial, recompute_ref_stats)
    pool, spatial = batch_activations(sample, backend, batch_size, cache, progress)
    if len(pool) < 2:
        raise UserError(f"{sample}: need at least 2 images for statistics, got {len(pool)}")
    if ref_stats[0].shape != pool.shape[1:] or ref_stats_s[0].shape != spatial.shape[1:]:
        raise UserError(
            f"{ref}: precomputed statistics have {ref_stats[0].shape}/{ref_stats_s[0].shape} dimensions but the "
            f"{backend.name} backend gives {pool.shape[1:]}/{spatial.shape[1:]}; pass --recompute-ref-stats"
        )
    precision, recall = precision_recall(ref_pool, pool, device=device)
    return {
        "inception_score": inception_score(backend.softmax(pool), split_size),
        "fid": frechet_distance(*activation_statistics(pool), *ref_stats),
        "sfid": frechet_distance(*activation_statistics(spatial), *ref_stats_s),
        "precision": precision,
        "recall": recall,
        "num_ref": len(ref_pool),
        "num_sample": len(pool),
        "backend": backend.name,
        "ref_statistics": source,
        "ref": str(ref),
        "sample": str(sample),
    }


def default_cache() -> Path:
    return cache_dir() / "activations"
