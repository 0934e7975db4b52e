"""Checkpoint input/output: every format users have, safe loading, clear errors, atomic writes.

Formats read: a raw state dict (DiT-XL-2-256x256.pt, TinyDiT-D14-MaskedKD-500K.pt, pruned outputs),
a training checkpoint ``{"model", "ema", "opt", ...}`` (``ema`` preferred), and safetensors. Pickles
are always opened with ``weights_only=True``: a checkpoint from the internet must not run code.
Pruned checkpoints stay plain state dicts; their kept indices and source model live in a JSON file
beside them (``<file>.json``), so the file still loads in the original repositories.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

StateDict = dict[str, torch.Tensor]


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model; the message is one line for the user."""


# ------------------------------------------------------------------------------------------- reading


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file into a dict (tensors on CPU) without running any code from it."""
    obj = _read(Path(path))
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def load_tensor(path: str | os.PathLike) -> torch.Tensor:
    """Read a file holding one pickled tensor (or nn.Parameter), on CPU, without running any code from it."""
    obj = _read(Path(path))
    if not isinstance(obj, torch.Tensor):
        raise CheckpointError(f"{str(path)!r} holds a {type(obj).__name__}, expected a tensor")
    return obj.detach()


def _read(path: Path) -> Any:
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory, expected a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes): the download or save did not finish")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not a readable safetensors file ({_first_line(e)})"
            ) from None
    try:
        # argparse.Namespace is a plain attribute bag: allowed so training checkpoints that store
        # their arguments (the original DiT train.py does) load under weights_only.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a class or function reference: code we will not run
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds Python objects other than tensors; refusing to unpickle code "
                f"from it (re-save it as a plain state dict: torch.save(model.state_dict(), ...))"
            ) from None
        raise CheckpointError(_corrupt_message(path, e)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(_corrupt_message(path, e)) from None
    return obj


def select_state_dict(obj: dict[str, Any], use_ema: bool = True, source: str = "checkpoint") -> StateDict:
    """The model weights inside a loaded checkpoint: ``ema`` (or ``model`` if not use_ema) of a training
    checkpoint, or the dict itself if it is a state dict. Strips DDP/compile prefixes."""
    if "ema" in obj or "model" in obj:
        key = "ema" if use_ema and "ema" in obj else "model"
        if key not in obj:
            raise CheckpointError(f"{source} has no 'model' entry (keys: {', '.join(map(str, obj))})")
        obj = obj[key]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source} is not a state dict: entries {bad[:3]} are not tensors")
    return {_strip_prefixes(k): v for k, v in obj.items()}


def load_state_dict(path: str | os.PathLike, use_ema: bool = True) -> StateDict:
    """Read a checkpoint of any supported format and return the model's state dict."""
    return select_state_dict(load_file(path), use_ema=use_ema, source=f"checkpoint {str(path)!r}")


def _corrupt_message(path: Path, e: BaseException) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        return f"checkpoint {str(path)!r} is a Git LFS pointer, not the weights: fetch it with 'git lfs pull'"
    return f"checkpoint {str(path)!r} is truncated or corrupt ({_first_line(e)})"


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


# ------------------------------------------------------------------------------------ loading a DiT


def infer_dit_config(state_dict: StateDict) -> dict[str, int]:
    """Architecture of a DiT state dict: depth, hidden size, patch, channels, input size, classes."""
    try:
        hidden, in_ch, patch, _ = state_dict["x_embedder.proj.weight"].shape
        tokens = state_dict["pos_embed"].shape[1]
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
        table = state_dict["y_embedder.embedding_table.weight"].shape[0]
        out = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    except KeyError as e:
        raise CheckpointError(f"this is not a DiT state dict (no {e.args[0]!r})") from None
    return dict(
        depth=len(blocks), hidden_size=hidden, patch_size=patch, in_channels=in_ch,
        input_size=int(round(tokens**0.5)) * patch, num_embeddings=table, learn_sigma=out == 2 * in_ch,
    )  # fmt: skip


def suggest_model(state_dict: StateDict) -> str | None:
    """The registered plain DiT name whose depth, width and patch size fit this state dict."""
    from models_with_layer_pruning import DiT_models

    cfg = infer_dit_config(state_dict)
    for name, build in DiT_models.items():
        arch = build.arch
        if arch["groups"] is None and all(arch[k] == cfg[k] for k in ("depth", "hidden_size", "patch_size")):
            return name
    return None


def model_hint(state_dict: StateDict, source_model: str) -> str:
    """The flags that build the model a (pruned) state dict loads into: a registry name, or the source and a depth."""
    fit = suggest_model(state_dict)
    if fit:
        return f"the pruned model is a --model {fit}"
    return f"the pruned model is a --model {source_model} --depth {infer_dit_config(state_dict)['depth']}"


def load_dit_weights(model: torch.nn.Module, source: str | os.PathLike | StateDict, use_ema: bool = True) -> None:
    """Strictly load DiT weights into ``model`` from a file or a state dict.

    A prunable model may take a plain checkpoint: its gate logits keep their initial values. Any other
    mismatch raises a one-line CheckpointError naming the keys and the ``--model`` that fits the file.
    """
    name = "state dict" if isinstance(source, dict) else f"checkpoint {str(source)!r}"
    state_dict = (
        select_state_dict(source, use_ema, name) if isinstance(source, dict) else load_state_dict(source, use_ema)
    )
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith("gate_logits")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing {summarize_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected {summarize_keys(unexpected)}")
        if shapes:
            k = shapes[0]
            problems.append(
                f"{len(shapes)} mis-shaped (e.g. {k}: file {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)})"
            )
        hint = ""
        try:
            cfg = infer_dit_config(state_dict)
            fit = suggest_model(state_dict)
            hint = (
                f"; the file holds a DiT of depth {cfg['depth']}, width {cfg['hidden_size']}, patch {cfg['patch_size']}"
            )
            hint += f", input {cfg['input_size']}" + (f": use --model {fit}" if fit else "")
        except CheckpointError:
            pass
        raise CheckpointError(f"{name} does not fit the model: {'; '.join(problems)}{hint}")
    model.load_state_dict(state_dict, strict=False)  # strictness checked above (gates may be absent)


def summarize_keys(keys: Iterable[str], limit: int = 4) -> str:
    """Compact description of many keys: block ranges collapsed, e.g. '168 keys (blocks.14-27.*)'."""
    keys = list(keys)
    blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))})
    others = [k for k in keys if not k.startswith("blocks.")]
    parts = []
    if blocks:
        runs, start = [], blocks[0]
        for a, b in zip(blocks, blocks[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        parts.append(f"blocks.{','.join(runs)}.*" if len(runs) > 1 else f"blocks.{runs[0]}.*")
    parts += others[:limit]
    more = len(others) - limit
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''} ({', '.join(parts)}{f', +{more} more' if more > 0 else ''})"


# ------------------------------------------------------------------------------------------- writing


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``obj`` atomically: a temporary file in the same folder, fsync, then rename over ``path``.

    ``.safetensors`` paths take a flat dict of tensors (``metadata`` goes into the header as JSON);
    other paths are written with ``torch.save``. ``metadata`` is also written beside the file as
    ``<file>.json``. A crash at any point leaves the previous file (or none), never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600 files: give the mode open() would (0644 under umask 022)
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".safetensors":
                from safetensors.torch import save

                header = {"metadata": json.dumps(metadata)} if metadata else None
                f.write(save({k: v.contiguous() for k, v in obj.items()}, metadata=header))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if metadata is not None:
        write_json_atomic(metadata_path(path), metadata)
    else:  # a stale sidecar would describe the previous file
        metadata_path(path).unlink(missing_ok=True)
    return path


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits a plain ``open(path, "w")`` gives a new file: 0666 less the umask. Files made by
    ``tempfile.mkstemp`` (0600) are set to this before they are renamed into place, so a checkpoint is as readable
    by the group and others as any file the user writes."""
    return 0o666 & ~current_umask()


def metadata_path(path: str | os.PathLike) -> Path:
    return Path(f"{path}.json")


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata saved with a checkpoint: ``<file>.json`` beside it, or a safetensors header."""
    side = metadata_path(path)
    if side.is_file():
        return json.loads(side.read_text())
    if Path(path).suffix == ".safetensors" and Path(path).is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if "metadata" in header:
            return json.loads(header["metadata"])
    return None


def save_pruned(
    state_dict: StateDict, path: str | os.PathLike, kept_indices: list[int], source_model: str,
    groups: list[list[int]] | None = None, **extra: Any,
) -> Path:  # fmt: skip
    """Save a shallow DiT as a plain state dict with its provenance (kept blocks, source model) beside it."""
    cfg = infer_dit_config(state_dict)
    metadata = {
        "kept_indices": list(kept_indices), "source_model": source_model, "groups": groups,
        "depth": cfg["depth"], "suggested_model": suggest_model(state_dict), **extra,
    }  # fmt: skip
    return save_checkpoint(dict(state_dict), path, metadata=metadata)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON via a temporary file and a rename (never half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
