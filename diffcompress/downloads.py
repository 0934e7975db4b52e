"""Weight files fetched once: a given path, else the cache, else a download (online only), else one clear error."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import UserError


def cache_dir() -> Path:
    """``$DIFFCOMPRESS_CACHE``, else ``$XDG_CACHE_HOME/diffcompress``, else ``~/.cache/diffcompress``."""
    if os.environ.get("DIFFCOMPRESS_CACHE"):
        return Path(os.environ["DIFFCOMPRESS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffcompress"


def fetch_weights(path: str | os.PathLike | None, filename: str, url: str, what: str, flag: str) -> Path:
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
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    try:
        from torch.hub import download_url_to_file

        download_url_to_file(url, str(partial), progress=True)
    except Exception as e:  # offline, proxy, or a dead link: say what to fetch and where to put it
        partial.unlink(missing_ok=True)
        raise UserError(
            f"the {what} is not in {target} and could not be downloaded ({type(e).__name__}). "
            f"Download {url} on a machine with network, then put it at {target} or pass {flag} PATH"
        ) from e
    os.replace(partial, target)
    return target


def file_digest(path: str | os.PathLike) -> str:
    """First 16 hex digits of the file's sha256: identifies weights in cache keys."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
