"""The architecture vector of APTP: which entry gates which channel group, head or block of the UNet.

Order (the spec's, so released codes load): width entries block by block (down blocks, mid, up
blocks); inside a block the ResNets first (one entry per GroupNorm group of conv1's output), then
the transformers ([self-attention heads, cross-attention heads, GEGLU groups] per transformer
block); then one depth entry per depth-gated block (last ResNet and last transformer of each
down/up block). SD2.1 gives 1606 width + 14 depth = 1620 entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.activations import GEGLU
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn


@dataclass(frozen=True)
class SubGate:
    """One contiguous run of the width part of the architecture vector."""

    name: str  # module path in the diffusers UNet (ResnetBlock2D, Attention or FeedForward)
    kind: str  # "resnet" | "attn1" | "attn2" | "ff"
    start: int
    size: int  # GroupNorm groups (resnet, ff) or heads (attention)
    depth_index: int | None  # the depth gate that removes the block holding this sub-gate, if any

    @property
    def stop(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class ArchLayout:
    subgates: tuple[SubGate, ...]
    depth_blocks: tuple[str, ...]  # module paths of the depth-gated blocks, in the spec's order

    @property
    def width_size(self) -> int:
        return self.subgates[-1].stop if self.subgates else 0

    @property
    def depth_size(self) -> int:
        return len(self.depth_blocks)

    @property
    def size(self) -> int:
        return self.width_size + self.depth_size

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ArchLayout:
        """Layout of any UNet2DConditionModel config made of SD's block types (built on the meta device)."""
        return cls.from_unet(meta_unet(config))

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel) -> ArchLayout:
        groups = unet.config.norm_num_groups
        subgates: list[SubGate] = []
        depth_blocks: list[str] = []

        def add(name: str, kind: str, size: int, depth: int | None) -> None:
            start = subgates[-1].stop if subgates else 0
            subgates.append(SubGate(name, kind, start, size, depth))

        stages = [(f"down_blocks.{i}", b, True) for i, b in enumerate(unet.down_blocks)]
        stages.append(("mid_block", unet.mid_block, False))
        stages += [(f"up_blocks.{i}", b, True) for i, b in enumerate(unet.up_blocks)]
        for path, block, gated_depth in stages:
            resnets = list(getattr(block, "resnets", None) or [])
            attentions = list(getattr(block, "attentions", None) or [])
            depth_of = {}
            if gated_depth:  # the last ResNet and the last transformer of each down/up block
                for kind, mods in (("resnets", resnets), ("attentions", attentions)):
                    if mods:
                        depth_of[f"{path}.{kind}.{len(mods) - 1}"] = len(depth_blocks)
                        depth_blocks.append(f"{path}.{kind}.{len(mods) - 1}")
            for j, resnet in enumerate(resnets):
                name = f"{path}.resnets.{j}"
                _check_resnet(name, resnet, up=path.startswith("up"), depth_gated=name in depth_of)
                add(name, "resnet", resnet.norm2.num_groups, depth_of.get(name))
            for j, transformer in enumerate(attentions):
                name = f"{path}.attentions.{j}"
                _check_transformer(name, transformer, groups)
                for k, tb in enumerate(transformer.transformer_blocks):
                    tb_name = f"{name}.transformer_blocks.{k}"
                    add(f"{tb_name}.attn1", "attn1", tb.attn1.heads, depth_of.get(name))
                    add(f"{tb_name}.attn2", "attn2", tb.attn2.heads, depth_of.get(name))
                    add(f"{tb_name}.ff", "ff", groups, depth_of.get(name))
        return cls(tuple(subgates), tuple(depth_blocks))


def meta_unet(config: Mapping[str, Any]) -> UNet2DConditionModel:
    """The UNet of ``config`` on the meta device: its structure without memory or weights."""
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def _check_resnet(name: str, resnet: nn.Module, up: bool, depth_gated: bool) -> None:
    if not isinstance(resnet, ResnetBlock2D) or resnet.time_embedding_norm != "default":
        raise ValueError(f"{name}: only ResnetBlock2D with time_embedding_norm='default' can be gated")
    # a removed ResNet passes on its input: all of it (down) or the part before the skip (up)
    out = resnet.conv2.out_channels
    if depth_gated and (resnet.in_channels <= out if up else resnet.in_channels != out):
        raise ValueError(f"{name}: {resnet.in_channels} -> {out} channels, it cannot be replaced by its identity")


def _check_transformer(name: str, transformer: nn.Module, groups: int) -> None:
    if not isinstance(transformer, Transformer2DModel) or not transformer.is_input_continuous:
        raise ValueError(f"{name}: only continuous-input Transformer2DModel blocks can be gated")
    for tb in transformer.transformer_blocks:
        if tb.attn2 is None or tb.only_cross_attention or not isinstance(tb.ff.net[0], GEGLU):
            raise ValueError(f"{name}: expected self-attention, cross-attention and a GEGLU feed-forward")
        if tb.ff.net[2].in_features % groups:
            raise ValueError(f"{name}: GEGLU inner dim {tb.ff.net[2].in_features} not divisible by {groups} groups")


def binarize(mask: torch.Tensor, layout: ArchLayout) -> torch.Tensor:
    """Straight-through threshold at 0.5; a sub-gate left all zero keeps its highest entry.

    Forward: hard 0/1 values; backward: identity to ``mask``. Works on [size] or [B, size].
    """
    hard = (mask.detach() > 0.5).to(mask.dtype)
    for sg in layout.subgates:
        seg = mask.detach()[..., sg.start : sg.stop]
        empty = hard[..., sg.start : sg.stop].sum(-1, keepdim=True) == 0
        best = torch.zeros_like(seg).scatter_(-1, seg.argmax(-1, keepdim=True), 1.0)
        hard[..., sg.start : sg.stop] = torch.where(empty, best, hard[..., sg.start : sg.stop])
    return hard + (mask - mask.detach())  # exact 0/1 forward: (mask - mask) is exactly zero
