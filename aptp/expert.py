"""An expert: the dense UNet (weights loaded first) sliced by a binary architecture code.

The result is still a ``UNet2DConditionModel`` (same class, same config, same key names for what is
kept), usable in diffusers pipelines. Sliced per the spec: ResNet conv1 output channels,
time_emb_proj rows, norm2 groups (same channels per group) and conv2 input channels; attention
q/k/v rows and to_out columns per head; GEGLU projection rows (both halves) and the output
linear's columns. Dropped blocks become parameter-free identities of the right kind.

On disk (one folder): ``expert.safetensors``, ``code.json`` (the binary code) and
``base_config.json`` (the dense UNet's config); ``load_expert`` rebuilds the sliced structure from
the last two and loads the weights strictly.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from diffcompress.checkpoint import (
    CheckpointError,
    check_weights,
    load_file,
    save_checkpoint,
    summarize_keys,
    write_json_atomic,
)

from .layout import ArchLayout, meta_unet

WEIGHTS, CODE, BASE_CONFIG = "expert.safetensors", "code.json", "base_config.json"


class DroppedResnet(nn.Module):
    """A removed ResNet: passes on the non-skip part of its input (all of it in a down block)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        return input_tensor[:, : self.out_channels]


class DroppedTransformer(nn.Module):
    """A removed Transformer2DModel: returns its input hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def materialize(
    unet: UNet2DConditionModel,
    code: torch.Tensor | Sequence[int],
    layout: ArchLayout | None = None,
    *,
    inplace: bool = False,
) -> UNet2DConditionModel:
    """Slice the dense ``unet`` (with its weights) by a binary ``code`` of ``layout.size`` entries.

    A copy unless ``inplace``; works on the meta device too (structure only).
    """
    if any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules()):
        raise ValueError("materialize needs a plain UNet: it has forward hooks (GatedUNet.remove() takes gates off)")
    layout = layout or ArchLayout.from_unet(unet)
    keep = check_code(code, layout)
    expert = unet if inplace else copy.deepcopy(unet)
    dropped = {p for i, p in enumerate(layout.depth_blocks) if not keep[layout.width_size + i]}
    for sg in layout.subgates:
        if sg.depth_index is not None and layout.depth_blocks[sg.depth_index] in dropped:
            continue
        kept = keep[sg.start : sg.stop].nonzero().flatten()
        if len(kept) < sg.size:
            _SLICERS[sg.kind](expert.get_submodule(sg.name), kept, sg.size)
    for path in dropped:
        parent, index = path.rsplit(".", 1)
        if ".resnets." in path:
            new = DroppedResnet(expert.get_submodule(path).conv2.out_channels)
        else:
            new = DroppedTransformer()
        expert.get_submodule(parent)[int(index)] = new
    return expert


def check_code(code: torch.Tensor | Sequence[int], layout: ArchLayout) -> torch.Tensor:
    """The code as a bool tensor; it must be binary, of the layout's size, with no empty kept sub-gate."""
    code = torch.as_tensor(code).detach().cpu().flatten()
    if code.numel() != layout.size:
        raise ValueError(f"code has {code.numel()} entries, the layout {layout.size}")
    if not ((code == 0) | (code == 1)).all():
        raise ValueError("code must be binary (binarize the mask first)")
    keep = code.bool()
    for sg in layout.subgates:
        alive = sg.depth_index is None or keep[layout.width_size + sg.depth_index]
        if alive and not keep[sg.start : sg.stop].any():
            raise ValueError(f"code keeps nothing of {sg.name} ({sg.kind}); binarize keeps at least one")
    return keep


def _slice_resnet(resnet: nn.Module, groups: torch.Tensor, num_groups: int) -> None:
    ch = _expand(groups, resnet.norm2.num_channels // num_groups)
    resnet.conv1 = _conv(resnet.conv1, rows=ch)
    resnet.time_emb_proj = _linear(resnet.time_emb_proj, rows=ch)
    norm = resnet.norm2
    with torch.device("meta"):  # no init work: the parameters are assigned right after
        resnet.norm2 = nn.GroupNorm(len(groups), len(ch), eps=norm.eps)
    resnet.norm2.weight, resnet.norm2.bias = _take(norm.weight, ch), _take(norm.bias, ch)
    resnet.conv2 = _conv(resnet.conv2, cols=ch)


def _slice_attention(attn: nn.Module, heads: torch.Tensor, num_heads: int) -> None:
    rows = _expand(heads, attn.to_q.out_features // num_heads)
    attn.to_q, attn.to_k, attn.to_v = (_linear(m, rows=rows) for m in (attn.to_q, attn.to_k, attn.to_v))
    attn.to_out[0] = _linear(attn.to_out[0], cols=rows)
    attn.heads = attn.sliceable_head_dim = len(heads)
    attn.inner_dim = attn.inner_kv_dim = len(rows)


def _slice_ff(ff: nn.Module, groups: torch.Tensor, num_groups: int) -> None:
    inner = ff.net[2].in_features
    ch = _expand(groups, inner // num_groups)
    ff.net[0].proj = _linear(ff.net[0].proj, rows=torch.cat([ch, ch + inner]))  # [value half; gate half]
    ff.net[2] = _linear(ff.net[2], cols=ch)


_SLICERS = {"resnet": _slice_resnet, "attn1": _slice_attention, "attn2": _slice_attention, "ff": _slice_ff}


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of the kept units (groups or heads) of ``width`` channels each."""
    return (units[:, None] * width + torch.arange(width)).flatten()


def _take(p: nn.Parameter | None, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None):
    """Rows / columns of a parameter as a new parameter (trainable iff the original was)."""
    if p is None:
        return None
    t = p.detach()
    t = t if rows is None else t[rows]
    t = t if cols is None else t[:, cols]
    return nn.Parameter(t, requires_grad=p.requires_grad)


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight, bias = _take(old.weight, rows, cols), _take(old.bias, rows)
    with torch.device("meta"):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight, new.bias = weight, bias
    return new


def _conv(old: nn.Conv2d, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Conv2d:
    if old.groups != 1:
        raise ValueError("grouped convolutions are not sliced")
    weight, bias = _take(old.weight, rows, cols), _take(old.bias, rows)
    with torch.device("meta"):
        new = nn.Conv2d(
            weight.shape[1], weight.shape[0], old.kernel_size, old.stride, old.padding, old.dilation,
            bias=bias is not None, padding_mode=old.padding_mode,
        )  # fmt: skip
    new.weight, new.bias = weight, bias
    return new


def save_expert(expert: UNet2DConditionModel, code: torch.Tensor | Sequence[int], path: str | os.PathLike) -> Path:
    """Write the expert's weights, its code and the dense UNet's config into the folder ``path``."""
    keep = check_code(code, ArchLayout.from_config(expert.config))
    state = {k: v.detach().cpu() for k, v in expert.state_dict().items()}
    if problems := _misfit(_skeleton(expert.config, keep), state):
        raise ValueError(f"the expert was not sliced by this code: {problems}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # a UNet loaded from a Path keeps it in _name_or_path; JSON takes it as a string
    write_json_atomic(
        folder / BASE_CONFIG, {k: str(v) if isinstance(v, os.PathLike) else v for k, v in expert.config.items()}
    )
    write_json_atomic(folder / CODE, {"code": keep.int().tolist()})
    save_checkpoint(state, folder / WEIGHTS)
    return folder


def load_expert(path: str | os.PathLike) -> tuple[UNet2DConditionModel, torch.Tensor]:
    """Rebuild the sliced UNet from the saved config and code, then load its weights strictly (eval mode)."""
    folder = Path(path)
    for name in (WEIGHTS, CODE, BASE_CONFIG):
        if not (folder / name).is_file():
            raise CheckpointError(f"expert folder {str(folder)!r} has no {name}")
    try:
        config = json.loads((folder / BASE_CONFIG).read_text())
        code = torch.tensor(json.loads((folder / CODE).read_text())["code"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"expert folder {str(folder)!r}: unreadable {BASE_CONFIG} or {CODE} ({e})") from None
    expert = _skeleton(config, code)
    state = load_file(folder / WEIGHTS)
    if problems := _misfit(expert, state):
        raise CheckpointError(f"{str(folder / WEIGHTS)!r} does not fit its code and config: {problems}")
    check_weights(state, repr(str(folder / WEIGHTS)), expert.state_dict())
    expert.load_state_dict(state, strict=True, assign=True)
    return expert.eval(), code


def _skeleton(config: Mapping[str, Any], code: torch.Tensor) -> UNet2DConditionModel:
    """The sliced structure of ``code`` on the meta device."""
    return materialize(meta_unet(config), code, inplace=True)


def _misfit(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Missing, unexpected and mis-shaped keys of ``state`` for ``skeleton`` (empty when it fits)."""
    expected = {k: v.shape for k, v in skeleton.state_dict().items()}
    problems = []
    if missing := expected.keys() - state.keys():
        problems.append(f"missing {summarize_keys(sorted(missing))}")
    if unexpected := state.keys() - expected.keys():
        problems.append(f"unexpected {summarize_keys(sorted(unexpected))}")
    if shaped := [k for k in expected.keys() & state.keys() if state[k].shape != expected[k]]:
        problems.append(f"mis-shaped {summarize_keys(sorted(shaped))}")
    return "; ".join(problems)
