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
import zlib
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
                    raise UserError(f"{self.path}: no {key!r} array (it has: {keys or 'nothing'})")
                with zf.open(f"{key}.npy") as f:
                    self.shape, self.dtype, self._offset = self._header(f, self.path)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
            raise UserError(
                f"{self.path}: not a readable npz archive ({type(e).__name__}: {_first_line(e)}; expected np.savez "
                f"output with {key!r})"
            ) from None
        self.key = key
        if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise UserError(f"{self.path}: {key} must be uint8 [N, H, W, 3], got {self.dtype} {list(self.shape)}")
        if self.shape[0] == 0 or self.shape[1] == 0 or self.shape[2] == 0:
            raise UserError(f"{self.path}: {key} holds no images (shape {list(self.shape)})")

    @staticmethod
    def _header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
        try:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise UserError(f"{path}: not a readable .npy array inside the archive ({_first_line(e)})") from None
        if fortran:
            raise UserError(
                f"{path}: Fortran-ordered arrays are not supported; save with np.savez(np.ascontiguousarray(x))"
            )
        return shape, dtype, f.tell()

    @property
    def image_size(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            f.read(self._offset)
            for start in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - start)
                try:
                    buf = f.read(n * per_image)
                except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
                    raise UserError(f"{self.path}: {self.key} is corrupt at image {start} ({_first_line(e)})") from None
                if len(buf) != n * per_image:
                    raise UserError(f"{self.path}: {self.key} is truncated at image {start}")
                yield np.frombuffer(buf, np.uint8).reshape(n, *self.shape[1:])


def _cache_file(path: Path, backend: InceptionBackend, root: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{backend.identity()}"
    return root / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def _read_cache(cached: Path, n: int) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """The (pool, spatial) activations a cache file holds for ``n`` images, or None and why it cannot be used."""
    try:
        with np.load(cached, allow_pickle=False) as z:
            if not {"pool", "spatial"} <= set(z.files):
                return None, f"it holds {', '.join(z.files) or 'nothing'}, expected pool and spatial"
            pool, spatial = z["pool"], z["spatial"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        return None, f"unreadable: {type(e).__name__}: {_first_line(e)}"
    for name, a in (("pool", pool), ("spatial", spatial)):
        if a.ndim != 2 or len(a) != n or a.shape[1] == 0 or not np.issubdtype(a.dtype, np.floating):
            return None, f"{name} is {a.dtype} {list(a.shape)}, expected float [{n}, D]"
        if not np.isfinite(a).all():
            return None, f"{name} holds NaN or inf values"
    return (pool, spatial), ""


def batch_activations(
    path: str | os.PathLike,
    backend: InceptionBackend,
    batch_size: int = 64,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(pool_3, spatial) features of every image in ``path``; with ``cache`` (a folder), reused while the file,
    its modification time and the backend's weights are unchanged. A cache file that cannot be read, or holds the
    wrong arrays or non-finite values, is said and rebuilt."""
    images = NpzImages(path)
    cached = _cache_file(images.path, backend, Path(cache)) if cache is not None else None
    if cached is not None and cached.is_file():
        found, why = _read_cache(cached, len(images))
        if found is not None:
            print(f"reusing activations of {images.path} from {cached}")
            return found
        print(f"note: activation cache {cached} is not usable ({why}); recomputing it")
    pools, spatials = [], []
    desc = f"{backend.name} inception: {images.path.name}"
    for batch in progress_bar(
        images.batches(batch_size), total=-(-len(images) // batch_size), desc=desc, disable=not progress
    ):
        pool, spatial = backend.activations(batch)
        pools.append(pool)
        spatials.append(spatial)
    pool, spatial = np.concatenate(pools), np.concatenate(spatials)
    if not (np.isfinite(pool).all() and np.isfinite(spatial).all()):
        raise UserError(
            f"{images.path}: the {backend.name} Inception gave NaN or inf activations: its weights "
            f"({backend.identity()}) are broken; pass the released --inception-weights / --inception-graph"
        )
    if cached is not None:
        tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.tmp.npz")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.savez(tmp, pool=pool, spatial=spatial)
            os.replace(tmp, cached)
        except OSError as e:  # a read-only or full cache folder costs a recomputation next time, not this result
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            print(f"note: could not write the activation cache {cached} ({e.strerror or e}); continuing without it")
    return pool, spatial


STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def precomputed_statistics(
    path: str | os.PathLike,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]] | None:
    """The reference file's own (mu, sigma) and (mu_s, sigma_s), checked (shapes, finite), or None without them."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not set(STAT_KEYS) <= set(z.files):
                return None
            stats = {k: z[k] for k in STAT_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: precomputed statistics are unreadable ({_first_line(e)})") from None
    for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
        m, s = stats[mu], stats[sigma]
        if m.ndim != 1 or s.shape != (len(m), len(m)) or len(m) == 0:
            raise UserError(
                f"{path}: precomputed {mu} {list(m.shape)} / {sigma} {list(s.shape)} are not a mean [D] and a "
                f"covariance [D, D]; pass --recompute-ref-stats"
            )
        for name, a in ((mu, m), (sigma, s)):
            if not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
                bad = "not numbers" if not np.issubdtype(a.dtype, np.number) else "NaN or inf values"
                raise UserError(
                    f"{path}: precomputed statistic {name} holds {bad}: the file is corrupt "
                    f"(pass --recompute-ref-stats to compute the statistics from its images)"
                )
    return (stats["mu"], stats["sigma"]), (stats["mu_s"], stats["sigma_s"])


def reference_statistics(
    path: str | os.PathLike, pool: np.ndarray, spatial: np.ndarray, recompute: bool = False
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], str]:
    """Pool and spatial (mu, sigma) of the reference: the file's precomputed ones when present, else computed."""
    found = None if recompute else precomputed_statistics(path)
    if found is not None:
        return found[0], found[1], "precomputed in the reference file"
    return activation_statistics(pool), activation_statistics(spatial), "computed from the reference images"


MIN_IMAGES = 4  # precision/recall: each point needs its k = 3 nearest other points


def check_batches(ref: NpzImages, sample: NpzImages) -> None:
    """The two batches can be compared: images of one size, enough of them for every metric."""
    if ref.image_size != sample.image_size:
        (h, w, _), (sh, sw, _) = ref.image_size, sample.image_size
        raise UserError(
            f"reference {ref.path} holds {h}x{w} images but sample {sample.path} holds {sh}x{sw}: the metrics "
            f"compare images of one size (use the reference batch of your resolution, or sample at {h}x{w})"
        )
    for what, batch in (("reference", ref), ("sample", sample)):
        if len(batch) < MIN_IMAGES:
            raise UserError(
                f"{what} {batch.path}: {len(batch)} image(s), need at least {MIN_IMAGES} (covariances and "
                f"precision/recall's 3 nearest neighbours)"
            )


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
    check_batches(NpzImages(ref), NpzImages(sample))  # both readable and comparable before any network runs
    precomputed = None if recompute_ref_stats else precomputed_statistics(ref)
    ref_pool, ref_spatial = batch_activations(ref, backend, batch_size, cache, progress)
    if precomputed is not None:
        (ref_stats, ref_stats_s), source = precomputed, "precomputed in the reference file"
    else:
        ref_stats, ref_stats_s, source = reference_statistics(ref, ref_pool, ref_spatial, recompute=True)
    pool, spatial = batch_activations(sample, backend, batch_size, cache, progress)
    if ref_stats[0].shape != pool.shape[1:] or ref_stats_s[0].shape != spatial.shape[1:]:
        raise UserError(
            f"{ref}: precomputed statistics have {ref_stats[0].shape}/{ref_stats_s[0].shape} dimensions but the "
            f"{backend.name} backend gives {pool.shape[1:]}/{spatial.shape[1:]}; pass --recompute-ref-stats"
        )
    precision, recall = precision_recall(ref_pool, pool, device=device)
    results = {
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
    bad = [k for k in ("inception_score", "fid", "sfid") if not np.isfinite(results[k])]
    if bad:  # never print a NaN as a result
        raise UserError(f"{sample} against {ref}: {', '.join(bad)} came out non-finite; nothing reported")
    return results


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def default_cache() -> Path:
    return cache_dir() / "activations"
