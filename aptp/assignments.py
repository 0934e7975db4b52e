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

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffcompress.checkpoint import check_weights, load_file, write_json_atomic
from diffcompress.errors import UserError

from . import mapped_indices, original
from .layout import ArchLayout
from .router import ROUTING_RULES, Router

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
    """``filtered/{split}.json``; without filtered/ files for ``split``, the same from the authors'
    ``{dataset}_{split}_mapped_indices.pt`` (``aptp.mapped_indices``: their rows mapped onto our caption table)."""
    if (authors := mapped_indices.instead_of_filtered(prune_dir, split)) is not None:
        return authors[1]
    path = _need(summary_path(prune_dir, split), f"captions of {split} not assigned to experts", _FILTER_HINT)
    return json.loads(path.read_text())


def read_expert_ids(prune_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The expert of every caption row of ``split`` (written by ``aptp.filter_dataset``, or the authors' file)."""
    if (authors := mapped_indices.instead_of_filtered(prune_dir, split)) is not None:
        return authors[0]
    return np.load(_need(expert_ids_path(prune_dir, split), f"captions of {split} not assigned", _FILTER_HINT))


def read_expert_rows(prune_dir: str | os.PathLike, split: str, expert: int) -> np.ndarray:
    """The caption rows of ``split`` routed to ``expert`` (written by ``aptp.filter_dataset``, or the authors' file)."""
    summary = read_summary(prune_dir, split)
    if not 0 <= expert < summary["num_experts"]:
        raise UserError(f"expert {expert}: the router of {prune_dir} has experts 0..{summary['num_experts'] - 1}")
    if (authors := mapped_indices.instead_of_filtered(prune_dir, split)) is not None:
        return np.flatnonzero(authors[0] == expert).astype(np.int64)
    return np.load(_need(expert_rows_path(prune_dir, split, expert), f"rows of expert {expert}", _FILTER_HINT))


_FILTER_HINT = "run `python -m aptp.filter_dataset --pruning_dir <dir> ...` first"
_PRUNE_HINT = "the output_dir of a finished `aptp.prune` run"


def pruning_config(prune_dir: str | os.PathLike) -> Path:
    """The pruning run's ``config.yaml`` (ours: in the directory; the authors': beside their checkpoint folder)."""
    path = Path(prune_dir) / "config.yaml"
    if not path.is_file() and original.is_authors_pruning_dir(prune_dir):
        path = original.run_config(prune_dir)[0] or path
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: the pruning directory must be an aptp.prune run (or the authors' checkpoint "
            f"folder inside their run folder, beside its config.yaml)"
        )
    return path


def read_router_info(prune_dir: str | os.PathLike) -> dict[str, Any]:
    """``router.json``, or for the authors' pruning checkpoint / released variant the same facts read from it."""
    if original.is_authors_pruning_dir(prune_dir):
        return original.read_info(prune_dir)
    return json.loads(_need(Path(prune_dir) / ROUTER_INFO, "no router description", _PRUNE_HINT).read_text())


def load_router(
    prune_dir: str | os.PathLike, layout: ArchLayout, device: str | torch.device = "cpu", routing: str | None = None
) -> Router:
    """The trained router of a pruning directory (eval mode; ours or the authors', ``aptp.original``), checked
    against the UNet's gate ``layout``, with its experts' codes from experts.json and its routing calibration from
    router.json; it routes by ``routing`` (``calibrated`` | ``cosine`` | ``authors``). None: ``calibrated``, except for
    an uncalibrated router of the authors' (calibration needs the training captions), which routes by their rule with a
    printed note. A router of ours written before calibration existed routes by cosine only when asked: ``calibrated``
    then fails in one line naming ``aptp.calibrate_routing``."""
    if routing is not None and routing not in ROUTING_RULES:
        raise UserError(f"routing {routing!r}: expected one of {', '.join(ROUTING_RULES)}")
    info = read_router_info(prune_dir)
    if info["layout_size"] != layout.size:
        raise UserError(
            f"{prune_dir}: the router was trained for {info['layout_size']} gates, this UNet has {layout.size}"
        )
    if original.is_authors_pruning_dir(prune_dir):
        router = original.read_router(prune_dir, layout)
    else:
        router = Router(
            layout, info["prompt_dim"], info["num_experts"], order=info.get("depth_order"),
            assignment=info.get("assignment", "argmax"),
            expert_threshold=info.get("expert_threshold", "none"),  # routers before it thresholded without noise
        )  # fmt: skip
        state = load_file(_need(Path(prune_dir) / ROUTER_WEIGHTS, "no router weights", _PRUNE_HINT))
        check_weights(state, str(Path(prune_dir) / ROUTER_WEIGHTS), router.state_dict())
        router.load_state_dict(state, strict=True)
        if (Path(prune_dir) / EXPERTS).is_file():
            experts = read_experts(prune_dir)["experts"]
            codes = [e["code"] for e in experts]
            if len(codes) != router.num_experts or any(len(c) != layout.size for c in codes):
                raise UserError(
                    f"{Path(prune_dir) / EXPERTS}: expected {router.num_experts} codes of {layout.size} gates"
                )
            router.fixed_codes = torch.tensor(codes, dtype=torch.float32)
            if all("sampled" in e for e in experts):  # converted from the authors' (their rule's code vectors)
                router.soft_codes = torch.tensor([e["sampled"] for e in experts], dtype=torch.float32)
    log_v = (info.get("routing") or {}).get("log_v")
    if log_v is not None:
        if len(log_v) != router.num_experts:
            raise UserError(f"{Path(prune_dir) / ROUTER_INFO}: routing.log_v has {len(log_v)} entries, not K")
        router.log_v = torch.tensor(log_v, dtype=torch.float64)
    elif router.num_experts == 1:
        router.log_v = torch.zeros(1, dtype=torch.float64)  # one expert: nothing to balance
    if routing is None and router.log_v is None and router.soft_codes is not None:
        print(
            f"note: {prune_dir} is the authors' router without our routing calibration: routing by their rule "
            f"(routing='authors'; for ours: `python -m aptp.convert_original`, then `aptp.calibrate_routing`)",
            file=sys.stderr,
        )
        routing = "authors"
    routing = routing or "calibrated"
    if routing == "calibrated" and router.log_v is None:
        raise UserError(
            f"{Path(prune_dir) / ROUTER_INFO} has no routing calibration (written before it existed): run "
            f"`python -m aptp.calibrate_routing --pruning_dir {prune_dir}` once, or route by plain cosine "
            f"(--routing cosine)"
        )
    router.routing = routing
    return router.to(device).eval()


def read_experts(prune_dir: str | os.PathLike, unet_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """``experts.json``: {budget, target, dense: {macs, params}, experts: [{expert, code, macs, params, ...}]}; for
    the authors' folders computed from their sampled codes (MACs at their pruning resolution; the UNet config from
    the folder, else ``unet_config``, else the SD model's)."""
    if original.is_authors_pruning_dir(prune_dir):
        return _authors_experts(str(Path(prune_dir).resolve()), json.dumps(unet_config, sort_keys=True))
    return json.loads(_need(Path(prune_dir) / EXPERTS, "no expert codes", _PRUNE_HINT).read_text())


@functools.lru_cache(maxsize=4)
def _authors_experts(prune_dir: str, unet_config_json: str) -> dict[str, Any]:
    from .filter_dataset import load_unet_config
    from .macs import mac_table
    from .prune import describe_experts

    info = original.read_info(prune_dir)
    config = original.unet_config(prune_dir) or json.loads(unet_config_json)
    config = config or load_unet_config(info["pretrained_model_name_or_path"])
    layout = ArchLayout.from_config(config)
    sampled = original.read_sampled_codes(prune_dir, info["num_experts"], layout.size)
    codes = original.hard_codes(sampled, layout, prune_dir)
    table = mac_table(config, info["resolution"] // 8, 77, layout)  # SD's VAE: latent = image / 8
    described = describe_experts(codes, table, config)
    for entry, values in zip(described["experts"], sampled.tolist()):
        entry["sampled"] = values
    return dict(budget=info["budget"], target=info["target"], **described)


def expert_code(prune_dir: str | os.PathLike, expert: int) -> torch.Tensor:
    """The binary architecture code of ``expert`` (int64 0/1 vector)."""
    experts = read_experts(prune_dir)["experts"]
    if not 0 <= expert < len(experts):
        raise UserError(f"expert {expert}: {prune_dir} has experts 0..{len(experts) - 1}")
    return torch.tensor(experts[expert]["code"], dtype=torch.int64)
