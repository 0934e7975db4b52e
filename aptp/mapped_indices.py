"""The authors' filtering files: ``{dataset}_train_mapped_indices.pt`` / ``{dataset}_validation_mapped_indices.pt``.

Their ``scripts/aptp/filter_dataset.py`` writes them into the pruning directory (``pruning_ckpt_dir``, its root):
a pickled 1-D int64 torch tensor per split, the expert of every row of the full split (saved from CUDA when there
was one; read here with ``map_location="cpu", weights_only=True``, so a pickle that carries code is refused).
``aptp.filter_dataset`` writes them too, beside our ``filtered/`` files, and ``aptp.assignments`` reads them when
``filtered/`` has nothing for a split, so a pruning folder from either side can be fine-tuned by either stage's
files.

Row order -- what a row of their file is, against a row of our caption table (``aptp.data.load_captions``):

- COCO: their row i is annotation i of ``annotations/captions_{train,val}2014.json``, in file order, whether or not
  its image exists. Our table keeps the annotations in file order but drops those whose image file is missing. With
  every image present the rows are the same; otherwise their rows are mapped to ours through the annotation file
  (annotation ids, which must be unique), and a file whose row count is not the annotation count is refused.
- CC3M: their row i is entry i of ``os.listdir(training/ or validation/)`` as their code cached it once in
  ``<cwd>/../data/{split}_cc3m_names.pkl`` (the caption: the TSV row named by the file's prefix before ``_``). That
  order is the file system's, not reproducible elsewhere; ours is TSV order (rows with an image). Their file is
  read only with that names pickle copied into the pruning directory as ``{split}_cc3m_names.pkl`` (a list of
  file names, read without running code): each of our rows takes the id of the first name with its TSV row.
  Without it the file is refused, saying why. We write CC3M files in the order of ``os.listdir`` at filtering time
  (the entries of our table) together with that names pickle, so our reader maps them back exactly. That their
  cache is such a plain list of names is an assumption (the facts sheet says "names"; a path list also reads).

Written by us: COCO only when our table has every annotation (no image missing): a file in their row space needs
an expert for every annotation, and captions without an image are not routed here (a note says so).

Checks on reading, each a one-line error naming the file: a 1-D integer tensor, ids in [0, K) (K: the pruning
directory's router; if that cannot be read, the largest id + 1, with a note in the summary), the row count of the
split (their table's: annotations or names), and, with several datasets' files in one folder, the dataset of the
pruning run's config.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diffcompress.checkpoint import CheckpointError, load_object
from diffcompress.errors import UserError

from .data import METADATA_SUFFIXES, CaptionTable, load_captions

SUFFIX = "_mapped_indices.pt"
DATASETS = ("cc3m", "coco")
FILE_SPLITS = {"train": "train", "validation": "validation", "val": "validation"}  # our split names -> theirs


def file_split(split: str) -> str:
    if split not in FILE_SPLITS:
        raise UserError(f"split {split!r}: the authors' filtering files exist for train and validation only")
    return FILE_SPLITS[split]


def mapped_indices_path(prune_dir: str | os.PathLike, dataset: str, split: str) -> Path:
    return Path(prune_dir) / f"{dataset}_{file_split(split)}{SUFFIX}"


def cc3m_names_path(prune_dir: str | os.PathLike, split: str) -> Path:
    return Path(prune_dir) / f"{file_split(split)}_cc3m_names.pkl"


# ---------------------------------------------------------------------------------------------------------------
# The file itself


def save_mapped_indices(path: str | os.PathLike, ids: np.ndarray) -> None:
    """``ids`` as a pickled 1-D int64 CPU tensor (a fresh storage: no larger tensor behind it), written atomically."""
    path = Path(path)
    tensor = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).clone()
    if tensor.ndim != 1:
        raise ValueError(f"expert ids must be 1-D, got shape {tuple(tensor.shape)}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(tensor, tmp)
    os.replace(tmp, path)


def load_mapped_indices(path: str | os.PathLike, num_experts: int | None = None) -> np.ndarray:
    """The expert ids of a mapped-indices file (int64 numpy, a copy), checked: a 1-D integer tensor with ids in
    ``[0, num_experts)`` (only ``>= 0`` when ``num_experts`` is None)."""
    path = Path(path)
    try:  # the checkpoint loader: a pickle that refers to code is said to hold code, refused
        tensor = load_object(path, what=repr(str(path)))
    except CheckpointError as e:
        raise UserError(f"{path}: not a tensor file of expert ids ({e})") from None
    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"{path}: holds a {type(tensor).__name__}, not a tensor of expert ids")
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise UserError(f"{path}: expert ids must be integers, the tensor is {tensor.dtype}")
    if tensor.ndim != 1:
        raise UserError(f"{path}: expert ids must be a 1-D tensor, got shape {tuple(tensor.shape)}")
    ids = tensor.detach().to(torch.int64).numpy().copy()  # a view of a larger tensor keeps only its own rows
    if len(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or (num_experts is not None and hi >= num_experts):
            bound = f"[0, {num_experts})" if num_experts is not None else ">= 0"
            raise UserError(f"{path}: expert ids must be in {bound} (the router's experts), found {lo}..{hi}")
    return ids


class _NoCode(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # lists, tuples and strings need no class
        raise pickle.UnpicklingError(f"refusing {module}.{name}: only a list of file names is read")


def load_cc3m_names(path: Path) -> list[str]:
    """Their CC3M row order: a pickled list of image file names (or paths), read without running code."""
    try:
        names = _NoCode(io.BytesIO(path.read_bytes())).load()
    except Exception as e:
        raise UserError(f"{path}: not a pickled list of file names ({type(e).__name__}: {e})") from None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{path}: not a pickled list of file names")
    return [os.path.basename(n) for n in names]


def _save_names_atomic(path: Path, names: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(list(names), protocol=4))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Writing (aptp.filter_dataset)


def write_for_table(
    prune_dir: str | os.PathLike, dataset: str, split: str, table: CaptionTable, ids: np.ndarray
) -> str:
    """Write ``{dataset}_{split}_mapped_indices.pt`` for the expert ``ids`` of ``table``'s rows (ours, in table
    order), in the authors' row order (module docstring); returns a line saying what was written or why not."""
    ids = np.asarray(ids, dtype=np.int64)
    path = mapped_indices_path(prune_dir, dataset, split)
    if len(ids) != len(table):
        raise ValueError(f"{len(ids)} expert ids for {len(table)} caption rows")
    if dataset == "coco":
        if table.missing:
            return (
                f"{path.name}: not written: {table.missing} captions of {table.source} have no image file, and the "
                f"authors' file needs an expert for every annotation"
            )
        save_mapped_indices(path, ids)
        return f"{path} (the authors' format, annotation order)"
    if dataset == "cc3m":
        image_dir = Path(table.paths[0]).parent if len(table) else None
        row_of = {os.path.basename(table.paths[j]): j for j in range(len(table))}
        names = [n for n in os.listdir(image_dir) if n in row_of] if image_dir else []
        if len(names) != len(table):  # a file renamed since the table was read
            return f"{path.name}: not written: {image_dir} changed while filtering"
        order = np.array([row_of[n] for n in names], dtype=np.int64)
        _save_names_atomic(cc3m_names_path(prune_dir, split), names)
        save_mapped_indices(path, ids[order])
        return f"{path} (the authors' format, os.listdir order: {cc3m_names_path(prune_dir, split).name})"
    return f"{path.name}: not written: the authors' filtering knows cc3m and coco only, not {dataset!r}"


# ---------------------------------------------------------------------------------------------------------------
# Reading (aptp.assignments, when filtered/ has nothing for a split)


def _config_data(prune_dir: Path) -> tuple[Path | None, dict[str, Any]]:
    """``data`` of the pruning run's config: ours in the pruning directory, theirs in the run folder above
    ``checkpoint-N``."""
    for config in (prune_dir / "config.yaml", prune_dir.parent / "config.yaml"):
        if config.is_file():
            try:
                data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
            except (yaml.YAMLError, AttributeError) as e:
                raise UserError(f"{config}: not a YAML config ({type(e).__name__})") from None
            return config, data if isinstance(data, dict) else {}
    return None, {}


def find_mapped_indices(prune_dir: str | os.PathLike, split: str, dataset: str | None = None) -> Path | None:
    """The authors' file of ``split`` in ``prune_dir`` (None when there is none). With files of several datasets,
    the one of ``dataset`` or of the pruning run's config; otherwise a one-line error."""
    prune_dir = Path(prune_dir)
    found = {d: p for d in DATASETS if (p := mapped_indices_path(prune_dir, d, split)).is_file()}
    if dataset is not None:
        return found.get(dataset)
    if len(found) <= 1:
        return next(iter(found.values()), None)
    config, data = _config_data(prune_dir)
    if data.get("dataset_name") in found:
        return found[data["dataset_name"]]
    raise UserError(
        f"{prune_dir} holds the authors' {file_split(split)} files of {' and '.join(found)}, and "
        f"{config or 'no config.yaml'} does not say which dataset was pruned: remove the other one"
    )


def _num_experts(prune_dir: Path) -> tuple[int | None, str | None]:
    from .assignments import read_router_info  # assignments imports this module

    try:
        return int(read_router_info(prune_dir)["num_experts"]), None
    except (UserError, KeyError, TypeError, ValueError, OSError) as e:
        return None, f"number of experts not read from the router ({e}): the largest id + 1"


def _coco_rows(path: Path, theirs: np.ndarray, table: CaptionTable, data_dir: str, split: str) -> np.ndarray:
    """Their COCO ids (one per annotation) on our table's rows."""
    ann = Path(data_dir) / "annotations" / f"captions_{'train' if split == 'train' else 'val'}2014.json"
    if not table.missing and len(theirs) == len(table):
        return theirs  # every annotation has its image: the same rows
    ann_ids = [a["id"] for a in json.loads(ann.read_text())["annotations"]]
    if len(theirs) != len(ann_ids):
        raise UserError(
            f"{path} has {len(theirs)} rows, our coco {split} table {len(table)} ({table.missing} captions without an "
            f"image dropped) of the {len(ann_ids)} annotations of {ann}: theirs has one row per annotation, so it was "
            f"not filtered from this annotation file"
        )
    position = {a: i for i, a in enumerate(ann_ids)}
    if len(position) != len(ann_ids):
        raise UserError(
            f"{path}: {ann} repeats annotation ids, so its {table.missing} captions without an image cannot be "
            f"told apart to map the authors' rows onto our {len(table)}"
        )
    return theirs[np.array([position[int(a)] for a in table.ids], dtype=np.int64)]


def _cc3m_rows(path: Path, theirs: np.ndarray, table: CaptionTable, prune_dir: Path, split: str) -> np.ndarray:
    """Their CC3M ids (one per name in their os.listdir order) on our table's rows."""
    names_path = cc3m_names_path(prune_dir, split)
    if not names_path.is_file():
        raise UserError(
            f"{path} has {len(theirs)} rows, our cc3m {split} table {len(table)} ({table.source}), in another order: "
            f"theirs is their os.listdir order ({names_path.name}, cached in their <cwd>/../data/), ours TSV order; "
            f"copy that file into {prune_dir} to map them, or run `python -m aptp.filter_dataset --pruning_dir "
            f"{prune_dir}`"
        )
    names = load_cc3m_names(names_path)
    if len(names) != len(theirs):
        raise UserError(f"{path} has {len(theirs)} rows, {names_path} names {len(names)} images: not the same run")
    first: dict[int, int] = {}
    for i, name in enumerate(names):
        m = re.match(r"(\d+)_", name)
        if m and not name.endswith(METADATA_SUFFIXES):
            first.setdefault(int(m.group(1)), i)
    rows = [first.get(int(r), -1) for r in table.ids]
    unnamed = sum(r < 0 for r in rows)
    if unnamed:
        raise UserError(
            f"{path} has {len(theirs)} rows, our cc3m {split} table {len(table)} ({table.source}): {unnamed} of ours "
            f"have no image in {names_path}, so they were not routed"
        )
    return theirs[np.array(rows, dtype=np.int64)]


_CACHE: dict[tuple, tuple[np.ndarray, dict[str, Any]]] = {}


def read_mapped(
    prune_dir: str | os.PathLike, split: str, dataset: str | None = None, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The expert of every row of our caption table of ``split`` and a summary like ``filtered/{split}.json``'s,
    from the authors' file in ``prune_dir``; None when there is none. ``dataset`` / ``data_dir``: by default the
    pruning run's config's (``data.dataset_name`` / ``data.data_dir``; ours beside it, theirs in the folder
    above)."""
    prune_dir = Path(prune_dir)
    path = find_mapped_indices(prune_dir, split, dataset)
    if path is None:
        return None
    file_dataset = path.name[: -len(f"_{file_split(split)}{SUFFIX}")]
    config, data = _config_data(prune_dir)
    if data.get("dataset_name") not in (None, file_dataset) and dataset is None and data_dir is None:
        raise UserError(f"{path} is for {file_dataset}, {config} pruned on {data['dataset_name']}")
    data_dir = data_dir or data.get("data_dir")
    if not data_dir:
        raise UserError(
            f"{path}: no data.data_dir in a config.yaml of {prune_dir} or its parent, so its rows cannot be checked "
            f"against the caption table (the data folder the authors filtered)"
        )
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(data_dir), split)
    names = cc3m_names_path(prune_dir, split)
    if names.is_file():
        key += (names.stat().st_mtime_ns,)
    if key in _CACHE:
        ids, summary = _CACHE[key]
        return ids.copy(), dict(summary)

    num_experts, note = _num_experts(prune_dir)
    theirs = load_mapped_indices(path, num_experts)
    table = load_captions(file_dataset, data_dir, split)
    if file_dataset == "coco":
        ids = _coco_rows(path, theirs, table, str(data_dir), split)
    else:
        ids = _cc3m_rows(path, theirs, table, prune_dir, split)
    if num_experts is None:
        num_experts = int(theirs.max()) + 1 if len(theirs) else 1
    summary = dict(
        split=split, rows=len(ids), num_experts=num_experts,
        rows_per_expert=np.bincount(ids, minlength=num_experts).tolist(), dataset=file_dataset,
        data_dir=str(data_dir), source=table.source, missing=table.missing, mapped_indices=str(path),
        authors_rows=len(theirs),
    )  # fmt: skip
    if note:
        summary["note"] = note
    _CACHE[key] = (ids, summary)
    return ids.copy(), dict(summary)


def instead_of_filtered(prune_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """``read_mapped`` when ``filtered/`` has nothing for ``split`` (ours win when both exist); else None."""
    from .assignments import expert_ids_path, summary_path

    if summary_path(prune_dir, split).is_file() or expert_ids_path(prune_dir, split).is_file():
        return None
    if split not in FILE_SPLITS:
        return None
    return read_mapped(prune_dir, split)
