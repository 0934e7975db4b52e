"""Tiny stand-ins for APTP's big models: a UNet config with SD2.1's block types and a sentence encoder
(built by aptp.make_tiny, which also makes the tiny pruning run's models)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState

from aptp.make_tiny import build_sentence_encoder

__all__ = ["TINY_UNET", "assert_same_tensors", "build_sentence_encoder", "reset_accelerate", "stop_and_resume"]

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


def reset_accelerate() -> None:
    """accelerate keeps process-wide state; the stages run one after another in this process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def stop_and_resume(
    main: Callable[[list[str]], None], args: list[str], straight: Path, stopped: Path, after: int
) -> None:
    """``main(args)`` (an APTP stage, in this process) once straight into ``straight``; once into ``stopped``, with a
    SIGTERM once its metrics.jsonl holds ``after`` steps (the loop checkpoints and returns), then resumed there."""
    main([*args, f"output_dir={straight}"])
    reset_accelerate()

    def wait_then_stop():
        metrics = stopped / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < after:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait_then_stop, daemon=True).start()
    main([*args, f"output_dir={stopped}"])
    reset_accelerate()
    main([*args, f"output_dir={stopped}", "logging.resume_from_checkpoint=latest"])
    reset_accelerate()


def assert_same_tensors(a: object, b: object, name: str) -> None:
    """Two nested structures of tensors (state dicts, optimizer states) equal bit for bit."""
    flat_a, flat_b = torch.utils._pytree.tree_flatten(a)[0], torch.utils._pytree.tree_flatten(b)[0]
    assert len(flat_a) == len(flat_b) > 0, name
    for x, y in zip(flat_a, flat_b):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, name
