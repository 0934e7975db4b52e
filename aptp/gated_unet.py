"""Width and depth gates on a diffusers UNet2DConditionModel, through hooks and an attention processor.

The UNet object itself is gated (keys and weights stay diffusers'). Each gate multiplies exactly the
tensor whose removal it stands for, so a zero gate equals removing that group, head or block:

- ResNet: the input of conv2 (after norm2, SiLU and dropout), per GroupNorm group of conv1's output.
- Attention (self and cross separately): each head's output, before ``to_out``.
- GEGLU: its output (the feed-forward's inner dim), in groups.
- Depth: ``(1 - m) * input + m * block(input)`` per sample; for an up-block ResNet the input is the
  non-skip part of the concatenation (diffusers concatenates ``[hidden_states, skip]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from .layout import ArchLayout


class GatedAttnProcessor:
    """SDPA attention (as diffusers' AttnProcessor2_0) with each head's output multiplied by its gate."""

    def __init__(self, gated: GatedUNet, name: str):
        self.gated = gated
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch = hidden_states.shape[0]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        gate = self.gated.gate(self.name, batch)
        if gate is not None:
            out = out * gate.to(out.dtype)[:, :, None, None]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class GatedUNet:
    """Gates installed on ``unet``. ``set_code(mask)`` gates it per sample; ``clear()`` makes it dense again.

    ``mask`` is [B, layout.size] (or [layout.size]) with values in [0, 1], soft or hard; a UNet batch
    that is a multiple of B (classifier-free guidance concatenates [uncond, cond]) reuses it tiled.
    """

    def __init__(self, unet: UNet2DConditionModel, layout: ArchLayout | None = None):
        self.unet = unet
        self.layout = layout or ArchLayout.from_unet(unet)
        self._gates: dict[str | int, torch.Tensor] | None = None  # sub-gate name or depth index
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._processors: dict[str, GatedAttnProcessor] = {}
        self._original_processors: dict[str, object] = {}
        for sg in self.layout.subgates:
            module = unet.get_submodule(sg.name)
            if sg.kind == "resnet":
                self._handles.append(module.conv2.register_forward_pre_hook(self._resnet_width_hook(sg.name)))
            elif sg.kind == "ff":
                self._handles.append(module.net[0].register_forward_hook(self._ff_width_hook(sg.name)))
            else:
                _check_attention(sg.name, module)
                self._original_processors[sg.name] = module.processor
                self._processors[sg.name] = GatedAttnProcessor(self, sg.name)
                module.set_processor(self._processors[sg.name])
        attention_names = {name for name, m in unet.named_modules() if isinstance(m, Attention)}
        if attention_names != set(self._processors):  # an ungated attention would escape the head gates
            raise ValueError(f"attention modules outside the layout: {sorted(attention_names - set(self._processors))}")
        for i, path in enumerate(self.layout.depth_blocks):
            module = unet.get_submodule(path)
            hook = self._depth_hook(i, "input_tensor" if ".resnets." in path else "hidden_states")
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))
        self._handles.append(unet.register_forward_pre_hook(self._check_processors))

    def __call__(self, *args, **kwargs):
        return self.unet(*args, **kwargs)

    def set_code(self, mask: torch.Tensor) -> None:
        if mask.shape[-1] != self.layout.size or mask.dim() not in (1, 2):
            raise ValueError(
                f"gate mask must be [B, {self.layout.size}] or [{self.layout.size}], got {tuple(mask.shape)}"
            )
        mask = mask.reshape(-1, self.layout.size)
        gates = {sg.name: mask[:, sg.start : sg.stop] for sg in self.layout.subgates}
        for i in range(self.layout.depth_size):
            gates[i] = mask[:, self.layout.width_size + i]
        self._gates = gates

    def clear(self) -> None:
        self._gates = None

    def remove(self) -> None:
        """Uninstall every hook and restore the original attention processors."""
        for handle in self._handles:
            handle.remove()
        for name, processor in self._original_processors.items():
            self.unet.get_submodule(name).set_processor(processor)
        self._handles, self._processors, self._gates = [], {}, None

    def gate(self, key: str | int, batch: int) -> torch.Tensor | None:
        """The gate of a sub-gate (its name) or depth block (its index) for a UNet batch (None: dense)."""
        if self._gates is None:
            return None
        gate = self._gates[key]
        if batch != gate.shape[0]:
            if batch % gate.shape[0]:
                raise ValueError(f"UNet batch {batch} is not a multiple of the gate batch {gate.shape[0]}")
            gate = gate.repeat(batch // gate.shape[0], *[1] * (gate.dim() - 1))
        return gate

    def _check_processors(self, module: nn.Module, args: tuple) -> None:
        for name, processor in self._processors.items():
            if self.unet.get_submodule(name).processor is not processor:
                raise RuntimeError(f"{name}: its attention processor was replaced, the head gates would be bypassed")

    def _resnet_width_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            gate = self.gate(name, x.shape[0])
            if gate is None:
                return None
            gate = gate.to(x.dtype).repeat_interleave(x.shape[1] // gate.shape[1], dim=1)
            return (x * gate[:, :, None, None], *args[1:])

        return hook

    def _ff_width_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            gate = self.gate(name, out.shape[0])
            if gate is None:
                return None
            gate = gate.to(out.dtype).repeat_interleave(out.shape[-1] // gate.shape[1], dim=1)
            return out * gate[:, None, :]

        return hook

    def _depth_hook(self, index: int, input_name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out):
            y = out if isinstance(out, torch.Tensor) else out[0]
            m = self.gate(index, y.shape[0])
            if m is None:
                return None
            x = args[0] if args else kwargs[input_name]
            m = m.to(y.dtype).view(-1, *[1] * (y.dim() - 1))
            y = (1 - m) * x[:, : y.shape[1]] + m * y  # up ResNets: the non-skip part of the input
            if isinstance(out, torch.Tensor):
                return y
            return (y, *out[1:]) if isinstance(out, tuple) else type(out)(sample=y)

        return hook


def _check_attention(name: str, attn: nn.Module) -> None:
    if not isinstance(attn, Attention):
        raise ValueError(f"{name}: expected a diffusers Attention module, got {type(attn).__name__}")
    unsupported = [
        flag
        for flag, on in [
            ("spatial_norm", attn.spatial_norm is not None),
            ("group_norm", attn.group_norm is not None),
            ("qk_norm", attn.norm_q is not None),
            ("added_kv_proj_dim", attn.added_kv_proj_dim is not None),
            ("residual_connection", attn.residual_connection),
            ("rescale_output_factor", attn.rescale_output_factor != 1.0),
            ("scale_qk=False", not attn.scale_qk),
        ]
        if on
    ]
    if unsupported:
        raise ValueError(f"{name}: attention features the gated processor does not implement: {unsupported}")
