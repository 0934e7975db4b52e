"""Exponential moving average of model weights, updated with one fused foreach call."""

from __future__ import annotations

import copy

import torch


def create_ema(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` in eval mode (starts equal to the model, as DiT's EMA does)."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every floating-point parameter; buffers are copied."""
    ema_params, params = [], []
    for e, p in zip(ema.parameters(), model.parameters()):
        if e.dtype.is_floating_point:
            ema_params.append(e)
            params.append(p.detach())
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
