"""Tiny stand-ins for APTP's big models: a UNet config with SD2.1's block types and a sentence encoder
(built by aptp.make_tiny, which also makes the tiny pruning run's models)."""

from __future__ import annotations

from aptp.make_tiny import build_sentence_encoder

__all__ = ["TINY_UNET", "build_sentence_encoder"]

# SD2.1's block types and layer counts at toy width: 2 down blocks (cross-attn, plain), mid, 2 up blocks.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=(2, 4),  # diffusers' name for the number of heads, as in SD2.1's config
    norm_num_groups=8,
    use_linear_projection=True,
)
