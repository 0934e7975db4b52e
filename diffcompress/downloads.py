"""Weight files fetched once: a given path, else the cache, else a download (online only), else one clear error.

Two caches: ``cache_dir()`` for helper weights (Inception), and ``pretrained_dir()`` for the released DiT
checkpoints, ``pretrained_models/`` as DiT's own ``download.py`` uses. ``resolve_checkpoint`` is what every
``--ckpt`` / ``--load-weight`` / ``--load-teacher`` goes through: a file, a released name, or a run folder's prefix.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .progress import progress_bar


@dataclass(frozen=True)
class Release:
    url: str
    sha256: str | None  # None: no published digest, the download is not checked (only its length)
    what: str


# The released checkpoints users pass by name. Neither DiT nor TinyFusion publishes sha256 digests, and none
# could be computed here (no network), so the digests are None: not checked. Fill them in once verified.
RELEASED = {
    "DiT-XL-2-256x256.pt": Release(
        "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", None, "DiT-XL/2 256x256 checkpoint"
    ),
    "DiT-XL-2-512x512.pt": Release(
        "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt", None, "DiT-XL/2 512x512 checkpoint"
    ),
    "TinyDiT-D14-MaskedKD-500K.pt": Release(
        "https://huggingface.co/fun-research/TinyDiT-D14-MaskedKD-500K/resolve/main/TinyDiT-D14-MaskedKD-500K.pt",
        None,
        "TinyDiT-D14 Masked KD 500K checkpoint",
    ),
}

RUN_NOTE_LIMIT = 12  # names listed in a "what exists" message


def cache_dir() -> Path:
    """``$DIFFCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/diffcompress``, else ``~/.cache/diffcompress``."""
    if os.environ.get("DIFFCOMPRESS_CACHE"):
        return Path(os.environ["DIFFCOMPRESS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffcompress"


def pretrained_dir() -> Path:
    """Where released checkpoints are looked up and downloaded: ``$DIFFCOMPRESS_PRETRAINED``, else
    ``pretrained_models/`` in the working directory (DiT's place, so its downloads are found)."""
    return Path(os.environ.get("DIFFCOMPRESS_PRETRAINED") or "pretrained_models")


def offline() -> bool:
    """``DIFFCOMPRESS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``): never try the network, fail at once instead."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes") for k in ("DIFFCOMPRESS_OFFLINE",
                                                                                     "HF_HUB_OFFLINE"))  # fmt: skip


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def download(url: str, target: str | os.PathLike, sha256: str | None = None, *, what: str = "file",
             flag: str = "--ckpt", timeout: float = 60.0) -> Path:  # fmt: skip
    """Download ``url`` to ``target`` through a temporary file beside it, renamed only once complete and (when
    ``sha256`` is given) verified: an interrupted or corrupt download never lies under the real name."""
    target = Path(target)
    hint = f"download {url} on a machine with network and put it at {target}, or pass {flag} PATH"
    if offline():
        raise UserError(f"the {what} is not at {target} and the network is off (DIFFCOMPRESS_OFFLINE): {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest, got, total = hashlib.sha256(), 0, None
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    with progress_bar(total=total, desc=f"download {target.name}", unit="B") as bar:
                        while chunk := response.read(1 << 20):
                            f.write(chunk)
                            digest.update(chunk)
                            got += len(chunk)
                            bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeout, bad response
                if got == 0:
                    raise UserError(f"the {what} is not at {target} and could not be downloaded "
                                    f"({type(e).__name__}): {hint}") from None  # fmt: skip
                raise UserError(f"the download of {url} broke off after {got} bytes ({type(e).__name__}); nothing "
                                f"was kept at {target}: run again to retry, or {hint}") from None  # fmt: skip
            if total is not None and got != total:  # the server closed early: http.client returns b"" then
                raise UserError(f"the download of {url} broke off after {got} of {total} bytes; nothing was kept "
                                f"at {target}: run again to retry, or {hint}")  # fmt: skip
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise UserError(f"the download of {url} has sha256 {digest.hexdigest()}, expected {sha256}; it was "
                                f"not kept at {target} (a changed or corrupted file): {hint}")  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o666 & ~_umask())  # mkstemp's 0600 -> the user's usual file mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"downloaded {url} to {target} ({got / 2**20:.1f} MiB" + (", sha256 checked)" if sha256 else ")"))
    return target


def fetch_weights(path: str | os.PathLike | None, filename: str, url: str, what: str, flag: str,
                  sha256: str | None = None) -> Path:  # fmt: skip
    """Resolve a weight file: ``path`` if given (must exist), else ``cache_dir()/filename``, else download ``url``
    there. ``what`` names the file in messages and ``flag`` is the option that takes a local copy."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"{flag} {p}: no such file ({what})")
        return p
    target = cache_dir() / filename
    if target.is_file():
        return target
    return download(url, target, sha256, what=what, flag=flag)


def released_locations(name: str) -> list[Path]:
    """Where a released checkpoint is looked for, in order: the cache, then TinyFusion's ``pretrained/``."""
    return [pretrained_dir() / name, Path("pretrained") / name]


def fetch_released(name: str, flag: str = "--ckpt") -> Path:
    """A released checkpoint by file name: a copy in the cache (or ``pretrained/``), else downloaded to the cache."""
    release = RELEASED[name]
    for candidate in released_locations(name):
        if candidate.is_file():
            return candidate
    return download(release.url, pretrained_dir() / name, release.sha256, what=release.what, flag=flag)


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    more = f", ... ({len(names)} in all)" if len(names) > RUN_NOTE_LIMIT else ""
    return (", ".join(names[:RUN_NOTE_LIMIT]) + more) if names else "nothing"


def resolve_run_prefix(path: str | os.PathLike, flag: str = "--ckpt") -> Path:
    """A missing ``path`` whose first missing folder is the prefix of exactly one existing run folder holding the
    rest of the path (``outputs/D14-Learned-Finetuning/...`` for ``outputs/D14-Learned-Finetuning-DiT-D14-2/...``
    or DiT's ``outputs/000-D14-Learned-Finetuning-...``): that file, with a printed note. Otherwise one line."""
    path = Path(path).expanduser()
    parts = path.parts
    i = next((i for i in range(len(parts)) if not Path(*parts[: i + 1]).exists()), None)
    if i is None:  # it exists, but is no regular file (a device, a pipe)
        raise UserError(f"{flag} {path}: not a regular file, expected a checkpoint file")
    parent = Path(*parts[:i]) if i else Path(".")
    missing, rest = parts[i], parts[i + 1 :]
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: no such file ({parent} is not a folder)")
    if not rest:  # the folder exists, the file does not: say what is there
        raise UserError(f"{flag} {path}: no such file; {parent} holds: {_listing(parent)}")
    pattern = re.compile(rf"(\d+-)?{re.escape(missing)}(-.+)?")
    runs = sorted(d for d in parent.iterdir() if d.is_dir() and pattern.fullmatch(d.name))
    hits = [d.joinpath(*rest) for d in runs if d.joinpath(*rest).is_file()]
    if len(hits) == 1:
        print(f"note: {flag} {path} does not exist; using {hits[0]} (the one run folder named {missing}-*)")
        return hits[0]
    if hits:
        raise UserError(f"{flag} {path}: no such file, and {len(hits)} run folders match {missing!r}: "
                        f"{', '.join(map(str, hits))}; pass one of them")  # fmt: skip
    if runs:
        inside = [f"{d}/{Path(*rest).parent}: {_listing(d / Path(*rest).parent)}" if (d / Path(*rest).parent).is_dir()
                  else f"{d}: {_listing(d)}" for d in runs]  # fmt: skip
        raise UserError(f"{flag} {path}: no such file; the run folders matching {missing!r} hold {'; '.join(inside)}")
    raise UserError(f"{flag} {path}: no such file or run folder; {parent} holds: {_listing(parent)}")


def _resolve_checkpoint(path: str, flag: str) -> str:
    p = Path(path).expanduser()
    if p.is_file():
        return str(p)
    if p.name in RELEASED and not p.exists():
        if p.parent != Path("."):  # e.g. the authors' pretrained/X.pt: look there, then where released names live
            print(f"note: {flag} {path} does not exist; looking for the released {p.name} by name")
        return str(fetch_released(p.name, flag))
    if p.is_dir():
        raise UserError(f"{flag} {path}: a folder, expected a checkpoint file; it holds: {_listing(p)}")
    return str(resolve_run_prefix(p, flag))


def resolve_checkpoint(path: str | os.PathLike | None, flag: str = "--ckpt") -> str | None:
    """What every checkpoint flag goes through: an existing file as it is; a released name (``DiT-XL-2-256x256.pt``,
    ``DiT-XL-2-512x512.pt``, ``TinyDiT-D14-MaskedKD-500K.pt``) from ``pretrained_dir()`` or downloaded there; a missing
    path that one run folder matches by prefix; else one line. ``None`` stays ``None``. Under torchrun rank 0
    resolves (and downloads) alone and tells the others the result or the error."""
    if path is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return _resolve_checkpoint(str(path), flag)
    box: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", _resolve_checkpoint(str(path), flag))]
        except UserError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]  # type: ignore[misc]
    if status == "error":
        raise UserError(value)
    return value


def file_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's sha256: identifies weights in cache keys."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
