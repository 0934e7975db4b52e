"""MAC accounting: counted by hooks on a forward pass, and predicted from an architecture code.

Counting rules (per forward, summed over the batch): conv k_h k_w (C_in / groups) C_out H_out W_out;
linear in_features x output elements; GroupNorm / LayerNorm and activations one per element (GEGLU:
GELU plus the product, two per output element); attention heads (2 L_q L_k d + L_q L_k) with L_k the
key length (77 text tokens for cross-attention). Additions of residuals, concatenations and resampling
by interpolation are not counted.

A code changes MACs only through its gates, linearly in the kept groups/heads of each sub-gate and by
removing whole depth-gated blocks, so the MACs under a code are
``total - prunable + sum_s depth(s) * unit_s * kept_s + sum_d depth_d * fixed_d``. The per-unit and
fixed parts are measured by hooks on the dense UNet and on one sliced to a single unit per sub-gate
(both on the meta device), so prediction and counting share one set of rules.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention
from torch import nn

from .expert import materialize
from .layout import ArchLayout, meta_unet


def _conv(m: nn.Conv2d, args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    return out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]


def _linear(m: nn.Linear, args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    return out.numel() * m.in_features


def _elementwise(m: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    return out.numel()


def _geglu(m: nn.Module, args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    return 2 * out.numel()


def _attention(m: Attention, args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    batch, lq = hidden.shape[0], hidden.shape[1]
    lk = lq if context is None else context.shape[1]
    d = m.to_q.out_features // m.heads
    return batch * m.heads * (2 * lq * lk * d + lq * lk)


_RULES = [
    (nn.Conv2d, _conv),
    (nn.Linear, _linear),
    ((nn.GroupNorm, nn.LayerNorm), _elementwise),
    ((nn.SiLU, nn.GELU, nn.Mish, nn.ReLU), _elementwise),
    (GEGLU, _geglu),
    (Attention, _attention),
]


def count_macs(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Run ``model(*args, **kwargs)`` (no grad) and return each module's own MACs, keyed by module path."""
    macs: dict[str, int] = defaultdict(int)

    def hook(name, rule):
        def record(module, args, kwargs, out):
            macs[name] += rule(module, args, kwargs, out)

        return record

    handles = [
        module.register_forward_hook(hook(name, rule), with_kwargs=True)
        for name, module in model.named_modules()
        for types, rule in _RULES
        if isinstance(module, types)
    ]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return dict(macs)


def subtree_macs(macs: Mapping[str, int], path: str) -> int:
    """MACs of the module at ``path`` and everything inside it."""
    return sum(v for k, v in macs.items() if k == path or k.startswith(path + "."))


def unet_inputs(
    unet: UNet2DConditionModel, latent_hw: int | tuple[int, int], text_len: int = 77, batch: int = 1
) -> dict[str, torch.Tensor]:
    """Zero inputs for one forward at ``latent_hw`` (image pixels / 8 for SD) on the UNet's device and dtype."""
    h, w = (latent_hw, latent_hw) if isinstance(latent_hw, int) else latent_hw
    p = next(unet.parameters())
    kw = dict(device=p.device, dtype=p.dtype)
    return dict(
        sample=torch.zeros(batch, unet.config.in_channels, h, w, **kw),
        timestep=torch.full((batch,), 500, device=p.device),
        encoder_hidden_states=torch.zeros(batch, text_len, unet.config.cross_attention_dim, **kw),
    )


def dense_macs(config: Mapping[str, Any], latent_hw: int | tuple[int, int], text_len: int = 77) -> int:
    """MACs of one UNet forward for one sample (counted by hooks on the meta device)."""
    unet = meta_unet(config)
    return sum(count_macs(unet, **unet_inputs(unet, latent_hw, text_len)).values())


def prunable_budget(p: float, total: float, prunable: float) -> float:
    """Keep ``p`` of all MACs -> keep ``p' = 1 - (1 - p) * total / prunable`` of the prunable MACs."""
    if not 0 < p <= 1:
        raise ValueError(f"budget must be in (0, 1], got {p}")
    target = 1 - (1 - p) * total / prunable
    if target <= 0:
        raise ValueError(f"budget {p} is unreachable: the unprunable MACs alone are {1 - prunable / total:.3f} of all")
    return target


@dataclass(frozen=True, eq=False)
class MacTable:
    """Per-sample MACs of a UNet at one resolution as a function of an architecture code (soft or hard)."""

    layout: ArchLayout
    total: int  # dense MACs of the whole UNet
    prunable: int  # dense MACs that some gate removes
    unit: torch.Tensor  # [width_size] MACs per kept entry of each sub-gate (float64)
    depth_fixed: torch.Tensor  # [depth_size] MACs of each depth-gated block besides its sub-gates' units
    width_depth: torch.Tensor  # [width_size] depth gate of each width entry, -1 for none

    def prunable_macs(self, code: torch.Tensor) -> torch.Tensor:
        """Prunable MACs under ``code`` ([..., layout.size]); differentiable in a soft code; float64."""
        c = code.double()
        unit, fixed, wd = (t.to(code.device) for t in (self.unit, self.depth_fixed, self.width_depth))
        width, depth = c[..., : self.layout.width_size], c[..., self.layout.width_size :]
        alive = torch.where(wd >= 0, depth[..., wd.clamp(min=0)], torch.ones_like(width))
        return (width * alive * unit).sum(-1) + (depth * fixed).sum(-1)

    def macs(self, code: torch.Tensor) -> torch.Tensor:
        """All MACs of the UNet under ``code`` (float64)."""
        return self.prunable_macs(code) + (self.total - self.prunable)

    def rho(self, code: torch.Tensor) -> torch.Tensor:
        """Resource ratio per sample: prunable MACs under the code / dense prunable MACs (float code's dtype)."""
        rho = self.prunable_macs(code) / self.prunable
        return rho.to(code.dtype) if code.is_floating_point() else rho

    def budget(self, p: float) -> float:
        """The prunable-MAC target p' for keeping ``p`` of all MACs."""
        return prunable_budget(p, self.total, self.prunable)


def mac_table(
    config: Mapping[str, Any], latent_hw: int | tuple[int, int], text_len: int = 77, layout: ArchLayout | None = None
) -> MacTable:
    """Measure the MAC table of ``config`` at ``latent_hw`` on the meta device (a few seconds for SD2.1)."""
    unet = meta_unet(config)
    layout = layout or ArchLayout.from_unet(unet)
    inputs = unet_inputs(unet, latent_hw, text_len)
    dense = count_macs(unet, **inputs)
    one_each = torch.ones(layout.size)
    for sg in layout.subgates:
        one_each[sg.start + 1 : sg.stop] = 0
    small = count_macs(materialize(unet, one_each, layout), **inputs)

    unit = torch.zeros(layout.width_size, dtype=torch.float64)
    width_depth = torch.full((layout.width_size,), -1, dtype=torch.long)
    fixed = [subtree_macs(dense, path) for path in layout.depth_blocks]
    for sg in layout.subgates:
        if sg.size > 1:  # a single unit is never pruned alone: it stays in the fixed part
            per_unit, rest = divmod(subtree_macs(dense, sg.name) - subtree_macs(small, sg.name), sg.size - 1)
            assert rest == 0, f"MACs of {sg.name} are not linear in its width"
            unit[sg.start : sg.stop] = per_unit
        if sg.depth_index is not None:
            width_depth[sg.start : sg.stop] = sg.depth_index
            fixed[sg.depth_index] -= int(unit[sg.start : sg.stop].sum())
    depth_fixed = torch.tensor(fixed, dtype=torch.float64)
    prunable = int(unit.sum()) + sum(fixed)
    return MacTable(layout, sum(dense.values()), prunable, unit, depth_fixed, width_depth)
