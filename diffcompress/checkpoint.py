"""Checkpoint input/output: every format users have, safe loading, clear errors, atomic writes.

Formats read: a raw state dict (DiT-XL-2-256x256.pt, TinyDiT-D14-MaskedKD-500K.pt, pruned outputs),
a training checkpoint ``{"model", "ema", "opt", ...}`` (``ema`` preferred), and safetensors. Pickles
are always opened with ``weights_only=True``: a checkpoint from the internet must not run code.
Pruned checkpoints stay plain state dicts; their kept indices and source model live in a JSON file
beside them (``<file>.json``), so the file still loads in the original repositories.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

StateDict = dict[str, torch.Tensor]


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model; the message is one line for the user."""


# ------------------------------------------------------------------------------------------- reading


def load_file(path: str | os.PathLike, flag: str | None = None) -> dict[str, Any]:
    """Read a checkpoint file into a dict (tensors on CPU) without running any code from it. ``flag``: the command-line
    flag that named the file, said in the errors."""
    obj = _read(Path(path), flag)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{_label(path, flag)} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def load_tensor(path: str | os.PathLike, flag: str | None = None) -> torch.Tensor:
    """Read a file holding one pickled tensor (or nn.Parameter), on CPU, without running any code from it."""
    obj = _read(Path(path), flag, what=repr(str(path)))
    if not isinstance(obj, torch.Tensor):
        raise CheckpointError(f"{_label(path, flag, repr(str(path)))} holds a {type(obj).__name__}, expected a tensor")
    return obj.detach()


def load_object(path: str | os.PathLike, flag: str | None = None, what: str | None = None) -> Any:
    """Read any pickled torch file (tensors, dicts, lists of them) on CPU, without running any code from it: a file
    whose pickle refers to code is refused as such. ``what``: how errors name the file (default ``checkpoint 'x'``)."""
    return _read(Path(path), flag, what)


def _label(path: str | os.PathLike, flag: str | None = None, what: str | None = None) -> str:
    """How errors name a file: ``checkpoint 'x.pt'``, with the flag that took it: ``checkpoint 'x.pt' (--ckpt)``."""
    text = what or f"checkpoint {str(path)!r}"
    return f"{text} ({flag})" if flag else text


def _read(path: Path, flag: str | None = None, what: str | None = None) -> Any:
    label = _label(path, flag, what)
    if path.is_dir():
        raise CheckpointError(f"{label} is a directory, expected a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{label} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{label} is empty (0 bytes): the download or save did not finish")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors

        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"{label} is not a readable safetensors file ({_first_line(e)})") from None
    try:
        # argparse.Namespace is a plain attribute bag: allowed so training checkpoints that store
        # their arguments (the original DiT train.py does) load under weights_only.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: said below
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load failing on a file is the file's fault: one line
        if code := code_references(path, e):
            raise CheckpointError(code_message(label, code)) from None
        raise CheckpointError(_corrupt_message(path, e, label)) from None
    return obj


# ------------------------------------------------------------------------------- pickles that hold code

# Said by torch when weights_only refuses a reference to a class or function; the wording changed across versions:
# 2.4-2.5 "Unsupported global: GLOBAL posix.system was not an allowed global by default", 2.6+ the same for most
# names and, for blocked modules (os, posix, subprocess, builtins.eval...), "Trying to load unsupported GLOBAL
# posix.system whose module posix is blocked."
_TORCH_CODE_PATTERNS = re.compile(
    r"unsupported global|not an allowed global|whose module \S+ is blocked|add_safe_globals", re.IGNORECASE
)
_TORCH_GLOBAL_NAME = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_IDENTIFIER = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")
_STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}


def code_references(
    path: str | os.PathLike, error: BaseException | None = None, data_modules: tuple[str, ...] = ()
) -> list[str]:
    """The classes and functions a pickled checkpoint refers to beyond what ``torch.load(weights_only=True)``
    allows (``posix.system``, ``builtins.eval``, a user class...): what unpickling would import and run. Read from
    the pickle's opcodes (a zip-format torch file's ``data.pkl``, a legacy torch file, a plain pickle), never by
    unpickling; and from ``error``, torch's refusal, in any of its versions' wordings. ``data_modules``: top-level
    modules also allowed (numpy for accelerate's RNG states)."""
    names = [n for n in _scan_globals(Path(path)) if not _allowed_global(n) and n.split(".")[0] not in data_modules]
    if not names and isinstance(error, pickle.UnpicklingError) and _TORCH_CODE_PATTERNS.search(str(error)):
        names = _TORCH_GLOBAL_NAME.findall(str(error))[:1] or ["a class or function"]
    return list(dict.fromkeys(names))


def code_message(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (
        f"{label} holds code, refused: its pickle refers to {shown}, Python objects other than tensors that "
        f"unpickling would import and run; a checkpoint must hold only tensors (get the weights from a trusted "
        f"source as a plain state dict, torch.save(model.state_dict(), ...), or as .safetensors)"
    )


def _allowed_global(name: str) -> bool:
    if name == "argparse.Namespace":
        return True
    try:
        from torch import _weights_only_unpickler

        allowed = set(_weights_only_unpickler._get_allowed_globals())
        allowed |= set(_weights_only_unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):  # a torch without these private tables: tensors' own rebuild functions
        return name.startswith(("torch._utils._rebuild", "torch._tensor._rebuild")) or name in (
            "collections.OrderedDict", "torch.Size", "torch.device", "torch.float32", "torch.float16", "torch.bfloat16",
        )  # fmt: skip
    return name in allowed


def _scan_globals(path: Path, limit: int = 1 << 28) -> list[str]:
    """GLOBAL / STACK_GLOBAL / INST names of the pickles in ``path`` (best effort: a damaged pickle gives the names
    before the damage). Plain pickles are only scanned when they start with a PROTO opcode, so text or random bytes
    are not read as opcodes."""
    import io

    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            try:
                with zipfile.ZipFile(path) as z:
                    names = []
                    for info in z.infolist():
                        if info.filename.endswith(".pkl") and info.file_size < limit:
                            names += _pickle_globals(io.BytesIO(z.read(info)), pickles=1)
                    return names
            except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError):  # truncated: the first entry
                with open(path, "rb") as f:
                    header = f.read(30)
                    method, size = int.from_bytes(header[8:10], "little"), int.from_bytes(header[26:28], "little")
                    f.seek(30 + size + int.from_bytes(header[28:30], "little"))
                    return _pickle_globals(f, pickles=1) if method == 0 else []
        if head[:1] == b"\x80":  # a pickle with a protocol (legacy torch files: five pickles, then raw storage bytes)
            with open(path, "rb") as f:
                return _pickle_globals(f, pickles=5)
    except OSError:
        pass
    return []


def _pickle_globals(f, pickles: int) -> list[str]:
    import pickletools

    names: list[str] = []
    for _ in range(pickles):
        pushed: list[str | None] = []
        memo: dict[int, str | None] = {}
        try:
            start = f.tell()
            for op, arg, _pos in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    names.append(_global_name(module, name))
                elif op.name == "STACK_GLOBAL":
                    module, name = pushed[-2:] if len(pushed) >= 2 else (None, None)
                    ok = isinstance(module, str) and isinstance(name, str)
                    names.append(_global_name(module, name) if ok else "a class or function named on the stack")
                elif op.name.startswith("EXT"):
                    names.append(f"copyreg extension {arg}")
                elif op.name in _MEMO_OPS:
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
                elif op.name.endswith("GET"):
                    pushed.append(memo.get(arg))
                elif op.name not in ("PROTO", "FRAME"):
                    pushed.append(str(arg) if op.name in _STRING_OPS else None)
            if f.tell() == start:
                break
        except Exception:  # noqa: BLE001 - damaged or not a pickle: the names read so far
            break
    return names


def _global_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 resolves it (protocol 0-2 pickles carry Python 2 names: ``__builtin__.eval``,
    ``commands.check_output`` for ``subprocess.check_output``)."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    full = f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
    return full if _IDENTIFIER.fullmatch(full) else repr(full)[:80]


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


def load_state_dict(path: str | os.PathLike, use_ema: bool = True, flag: str | None = None) -> StateDict:
    """Read a checkpoint of any supported format and return the model's state dict. Its metadata (``<file>.json``
    or the safetensors header: kept blocks, groups, source model) is checked against it."""
    state_dict = select_state_dict(load_file(path, flag), use_ema=use_ema, source=_label(path, flag))
    try:
        depth = infer_dit_config(state_dict)["depth"]
    except (CheckpointError, ValueError, TypeError):
        depth = None  # not a DiT: only the metadata's own consistency is checked
    read_metadata(path, depth=depth)
    return state_dict


def _corrupt_message(path: Path, e: BaseException, label: str | None = None) -> str:
    label = label or _label(path)
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        return f"{label} is a Git LFS pointer, not the weights: fetch it with 'git lfs pull'"
    return f"{label} is truncated or corrupt ({_torch_reason(e)})"


def _torch_reason(e: BaseException) -> str:
    """The line of a torch.load error that says what is wrong with the file, without torch's advice to load it with
    ``weights_only=False`` (never given for a file from elsewhere)."""
    skip = ("weights only load failed", "weights_only", "please file an issue", "check the documentation", "(1)", "(2)")
    for line in str(e).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not any(s in line.lower() for s in skip):
            return f"{type(e).__name__}: {line[:200]}" if isinstance(e, pickle.UnpicklingError) else line[:200]
    return type(e).__name__


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


def load_dit_weights(
    model: torch.nn.Module, source: str | os.PathLike | StateDict, use_ema: bool = True, flag: str | None = None,
    model_flag: str = "--model", name: str | None = None,
) -> None:  # fmt: skip
    """Strictly load DiT weights into ``model`` from a file or a state dict.

    A prunable model may take a plain checkpoint: its gate logits keep their initial values. Any other
    mismatch raises a one-line CheckpointError naming the keys, the flag that took the file (``flag``: ``--ckpt``,
    ``--load-weight``...) and the ``model_flag`` (``--model``, ``--teacher``) that fits the file. Weights that are not
    floating point or not finite are refused (see ``check_weights``); so is metadata beside the file that does not
    describe it (see ``check_metadata``).
    """
    if name is None:
        name = ("state dict" + (f" of {flag}" if flag else "")) if isinstance(source, dict) else _label(source, flag)
    if isinstance(source, dict):
        state_dict = select_state_dict(source, use_ema, name)
    else:
        state_dict = load_state_dict(source, use_ema, flag)
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
            hint += f", input {cfg['input_size']}" + (f": use {model_flag} {fit}" if fit else "")
        except CheckpointError:
            pass
        raise CheckpointError(f"{name} does not fit the model: {'; '.join(problems)}{hint}")
    check_weights(state_dict, name, own)
    model.load_state_dict(state_dict, strict=False)  # strictness checked above (gates may be absent)


ALLOW_BAD_WEIGHTS = "DIFFCOMPRESS_ALLOW_NONFINITE_WEIGHTS"


def check_weights(state_dict: StateDict, source: str, reference: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse weights that would load and then sample black (or NaN) images: a tensor that is not floating point
    where the model holds floats (an int64 or bool tensor is silently cast on loading), or one with NaN or inf
    values. ``reference``: the model's own state dict (only its floating-point entries are checked); without it every
    tensor must be floating point. Setting ``DIFFCOMPRESS_ALLOW_NONFINITE_WEIGHTS=1`` skips the check (to inspect a
    diverged run's weights, say). One line names the tensors."""
    if os.environ.get(ALLOW_BAD_WEIGHTS, "") not in ("", "0"):
        return
    problems = []
    for key, value in state_dict.items():
        target = reference.get(key) if reference is not None else None
        if reference is not None and (target is None or not target.is_floating_point()):
            continue
        if not value.is_floating_point():
            problems.append(f"{key!r} is {str(value.dtype).removeprefix('torch.')}, not floating point")
        elif value.numel() and not bool(torch.isfinite(value).all()):
            bad = value.numel() - int(torch.isfinite(value).sum())
            problems.append(f"{key!r} has {bad} NaN/inf value{'s' if bad != 1 else ''} of {value.numel()}")
    if problems:
        more = f" (+{len(problems) - 3} more tensors)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"{source}: tensor {'; '.join(problems[:3])}{more}: such weights sample black or NaN images; refused "
            f"(set {ALLOW_BAD_WEIGHTS}=1 to load them anyway)"
        )


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
    remove_partial_writes(path.parent, path.name)  # an earlier write of this file that was killed mid-way
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise _named(e, path.parent) from None
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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk is said for the file being written (the previous one is intact)
            raise _named(e, path) from None
        raise
    if metadata is not None:
        write_json_atomic(metadata_path(path), metadata)
    else:  # a stale sidecar would describe the previous file
        metadata_path(path).unlink(missing_ok=True)
    return path


TEMP_SUFFIX = ".tmp"  # save_checkpoint's temporary files: .<name>.<random>.tmp beside <name>


def remove_partial_writes(folder: str | os.PathLike, name: str = "*") -> list[Path]:
    """Delete the temporary files that writes killed mid-way left in ``folder`` (of ``name``, default all), and
    return them: save_checkpoint's ``.<name>.<random>.tmp``, write_json_atomic's ``.<name>.<pid>.tmp``, atomic_path's
    ``.<name>.<pid>.tmp<suffix>``. A complete file is renamed into place, so these are never a checkpoint."""
    removed = []
    found = {*Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"), *Path(folder).glob(f".{name}.*{TEMP_SUFFIX}.*")}
    for tmp in sorted(found):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write (keeping its suffix, e.g. for np.savez), renamed over ``path`` when
    the block ends, removed if it fails; an OSError (a full disk) names ``path``. Never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}{path.suffix}")  # np.savez wants its .npz last
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _named(e, path) from None
        raise


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with ``path`` as its file name when it has none (a write to an open file names no file)."""
    if e.filename is not None:
        return e
    return type(e)(e.errno, e.strerror or str(e), str(path))


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


def read_metadata(path: str | os.PathLike, depth: int | None = None) -> dict[str, Any] | None:
    """The metadata saved with a checkpoint: ``<file>.json`` beside it, or a safetensors header; checked by
    ``check_metadata`` (against the checkpoint's ``depth`` when given). One-line CheckpointError naming the file."""
    side = metadata_path(path)
    if side.is_file():
        where = f"metadata {str(side)!r}"
        try:
            meta = json.loads(side.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where} beside {str(path)!r} is not valid JSON ({_first_line(e)})") from None
        except OSError as e:
            raise CheckpointError(f"{where} beside {str(path)!r} cannot be read ({e.strerror or e})") from None
        return check_metadata(meta, where, depth)
    if Path(path).suffix == ".safetensors" and Path(path).is_file():
        from safetensors import SafetensorError, safe_open

        where = f"the metadata in the header of {str(path)!r}"
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            meta = json.loads(header["metadata"]) if "metadata" in header else None
        except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{where} is not readable JSON ({_first_line(e)})") from None
        return None if meta is None else check_metadata(meta, where, depth)
    return None


def check_metadata(meta: Any, where: str, depth: int | None = None) -> dict[str, Any]:
    """Check a pruned checkpoint's metadata (see ``save_pruned``) before anything trusts it: ``kept_indices`` a
    non-empty increasing list of block numbers within the source model, ``depth`` and ``groups`` ([N, M] pairs
    covering the source depth, N kept in each) consistent with them. With ``depth`` (the state dict's): as many kept
    indices as blocks in the file, and ``source_model`` a registered model. One line naming ``where`` and the
    mismatch."""

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {problem} (it records the pruned file's provenance: fix or remove it)")

    if not isinstance(meta, dict):
        raise fail(f"holds a JSON {type(meta).__name__}, expected an object")
    kept, groups, source = meta.get("kept_indices"), meta.get("groups"), meta.get("source_model")
    recorded = meta.get("depth")
    if recorded is not None and (not _is_int(recorded) or recorded < 1):
        raise fail(f"depth {recorded!r} is not a positive integer")
    if recorded is not None and depth is not None and recorded != depth:
        raise fail(f"says depth {recorded}, the checkpoint holds {depth} blocks")
    if source is not None and not isinstance(source, str):
        raise fail(f"source_model {source!r} is not a model name")
    source_depth = meta.get("source_depth")
    if source_depth is not None and (not _is_int(source_depth) or source_depth < 1):
        raise fail(f"source_depth {source_depth!r} is not a positive integer")
    if depth is not None and (kept is not None or groups is not None):
        from models_with_layer_pruning import DiT_models

        if source not in DiT_models:
            raise fail(f"source_model {source!r} is not a registered model (expected one of DiT-XL/2, DiT-B/2, ...)")
        source_depth = source_depth or DiT_models[source].arch["depth"]
    if kept is None:
        if groups is not None:
            raise fail("has groups but no kept_indices")
        return meta
    if not isinstance(kept, list) or not kept or not all(_is_int(i) for i in kept):
        raise fail(f"kept_indices {str(kept)[:80]} is not a non-empty list of block numbers")
    if any(b <= a for a, b in zip(kept, kept[1:])) or kept[0] < 0:
        raise fail(f"kept_indices {kept} are not increasing block numbers from 0")
    if source_depth is not None and kept[-1] >= source_depth:
        bad = [i for i in kept if i >= source_depth]
        raise fail(f"kept_indices {bad} are out of range for {source or 'the source model'} of depth {source_depth}")
    if recorded is not None and recorded != len(kept):
        raise fail(f"says depth {recorded} but lists {len(kept)} kept_indices")
    if depth is not None and len(kept) != depth:
        raise fail(f"lists {len(kept)} kept_indices, the checkpoint holds {depth} blocks")
    if groups is not None:
        pairs = groups if isinstance(groups, list) else None
        if not pairs or not all(isinstance(g, list) and len(g) == 2 and all(_is_int(x) for x in g) for g in pairs):
            raise fail(f"groups {str(groups)[:80]} is not a list of [N, M] pairs")
        if any(not 1 <= n <= m for n, m in pairs):
            raise fail(f"groups {pairs} has a pair [N, M] without 1 <= N <= M")
        if source_depth is not None and sum(m for _, m in pairs) != source_depth:
            raise fail(f"groups {pairs} cover {sum(m for _, m in pairs)} blocks, {source} has {source_depth}")
        start = 0
        for g, (n, m) in enumerate(pairs):
            inside = [i for i in kept if start <= i < start + m]
            if len(inside) != n:
                blocks = f"blocks {start}-{start + m - 1}"
                raise fail(f"group {g} [{n}, {m}] ({blocks}) keeps {inside}, expected {n} of them")
            start += m
        if kept[-1] >= start:
            raise fail(f"kept_indices {[i for i in kept if i >= start]} lie beyond the groups' {start} blocks")
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
