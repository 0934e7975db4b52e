"""Where the stages after pruning find what pruning and filtering wrote: the router, the expert codes and each
caption's expert.

A pruning run's ``output_dir`` (the "pruning directory") holds, from ``aptp.prune``:

- ``router.pt`` + ``router.json``: the router's weights and what rebuilds it (prompt encoder, prompt dim, K, ...);
- ``experts.json``: each expert's binary code, MACs and parameters;

and, from ``aptp.filter_dataset``, the folder ``filtered/``:

- ``{split}_expert_ids.npy``: int64 [N], the expert of every row of ``load_captions(dataset, data_dir, split)``
  (rows in table order);
- ``{split}_expert_{k}.npy``: int64, the rows of expert ``k`` (ascending);
- ``{split}.json``: dataset, data dir, row count and rows per expert.

Fine-tuning and generation read these names through this module only, so they cannot drift apart.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcompress.checkpoint import load_file, write_json_atomic
from diffcompress.errors import UserError

from .layout import ArchLayout
from .router import Router

ROUTER_WEIGHTS, ROUTER_INFO, EXPERTS = "router.pt", "router.json", "experts.json"
FILTERED = "filtered"


def filtered_dir(prune_dir: str | os.PathLike) -> Path:
    return Path(prune_dir) / FILTERED


def expert_ids_path(prune_dir: str | os.PathLike, split: str) -> Path:
    return filtered_dir(prune_dir) / f"{split}_expert_ids.npy"


def expert_rows_path(prune_dir: str | os.PathLike, split: str, expert: int) -> Path:
    return filtered_dir(prune_dir) / f"{split}_expert_{expert}.npy"


def summary_path(prune_dir: str | os.PathLike, split: str) -> Path:
    return filtered_dir(prune_dir) / f"{split}.json"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_assignments(
    prune_dir: str | os.PathLike, split: str, expert_ids: np.ndarray, num_experts: int, **meta: Any
) -> dict[str, Any]:
    """Write ``filtered/{split}_*``: the expert of every caption row, the rows of each expert and a summary."""
    ids = np.asarray(expert_ids, dtype=np.int64)
    if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= num_experts)):
        raise ValueError(f"expert ids must be a vector of values in [0, {num_experts}), got {ids}")
    filtered_dir(prune_dir).mkdir(parents=True, exist_ok=True)
    _save_npy_atomic(expert_ids_path(prune_dir, split), ids)
    counts = np.bincount(ids, minlength=num_experts)
    for k in range(num_experts):
        _save_npy_atomic(expert_rows_path(prune_dir, split, k), np.flatnonzero(ids == k).astype(np.int64))
    summary = dict(split=split, rows=len(ids), num_experts=num_experts, rows_per_expert=counts.tolist(), **meta)
    write_json_atomic(summary_path(prune_dir, split), summary)
    return summary


def _need(path: Path, what: str, how: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path} does not exist: {what} ({how})")
    return path


def read_summary(prune_dir: str | os.PathLike, split: str) -> dict[str, Any]:
    path = _need(summary_path(prune_dir, split), f"captions of {split} not assigned to experts", _FILTER_HINT)
    return json.loads(path.read_text())


def read_expert_ids(prune_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The expert of every caption row of ``split`` (written by ``aptp.filter_dataset``)."""
    return np.load(_need(expert_ids_path(prune_dir, split), f"captions of {split} not assigned", _FILTER_HINT))


def read_expert_rows(prune_dir: str | os.PathLike, split: str, expert: int) -> np.ndarray:
    """The caption rows of ``split`` routed to ``expert`` (written by ``aptp.filter_dataset``)."""
    summary = read_summary(prune_dir, split)
    if not 0 <= expert < summary["num_experts"]:
        raise UserError(f"expert {expert}: the router of {prune_dir} has experts 0..{summary['num_experts'] - 1}")
    return np.load(_need(expert_rows_path(prune_dir, split, expert), f"rows of expert {expert}", _FILTER_HINT))


_FILTER_HINT = "run `python -m aptp.filter_dataset --pruning_dir <dir> ...` first"
_PRUNE_HINT = "the output_dir of a finished `aptp.prune` run"


def read_router_info(prune_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads(_need(Path(prune_dir) / ROUTER_INFO, "no router description", _PRUNE_HINT).read_text())


def load_router(prune_dir: str | os.PathLike, layout: ArchLayout, device: str | torch.device = "cpu") -> Router:
    """The trained router of a pruning directory (eval mode), checked against the UNet's gate ``layout``."""
    info = read_router_info(prune_dir)
    if info["layout_size"] != layout.size:
        raise UserError(
            f"{prune_dir}: the router was trained for {info['layout_size']} gates, this UNet has {layout.size}"
        )
    router = Router(layout, info["prompt_dim"], info["num_experts"], order=info.get("depth_order"))
    state = load_file(_need(Path(prune_dir) / ROUTER_WEIGHTS, "no router weights", _PRUNE_HINT))
    router.load_state_dict(state, strict=True)
    return router.to(device).eval()


def read_experts(prune_dir: str | os.PathLike) -> dict[str, Any]:
    """``experts.json``: {budget, target, dense: {macs, params}, experts: [{expert, code, macs, params, ...}]}."""
    return json.loads(_need(Path(prune_dir) / EXPERTS, "no expert codes", _PRUNE_HINT).read_text())


def expert_code(prune_dir: str | os.PathLike, expert: int) -> torch.Tensor:
    """The binary architecture code of ``expert`` (int64 0/1 vector)."""
    experts = read_experts(prune_dir)["experts"]
    if not 0 <= expert < len(experts):
        raise UserError(f"expert {expert}: {prune_dir} has experts 0..{len(experts) - 1}")
    return torch.tensor(experts[expert]["code"], dtype=torch.int64)
