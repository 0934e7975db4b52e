"""Noise schedules and timestep respacing (float64, as the reference implementation computes them)."""

from __future__ import annotations

import math

import numpy as np


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Betas for ``linear`` (DDPM's 1e-4..0.02, rescaled to the step count) or ``squaredcos_cap_v2`` (IDDPM cosine)."""
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_diffusion_timesteps, dtype=np.float64)
        t1, t2 = steps / num_diffusion_timesteps, (steps + 1) / num_diffusion_timesteps
        return np.minimum(1 - np.array([alpha_bar(b) / alpha_bar(a) for a, b in zip(t1, t2)]), 0.999)
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'squaredcos_cap_v2'")


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> set[int]:
    """Which of the original steps a respaced process keeps.

    ``section_counts``: an int or ``"250"`` (evenly spaced, including the first and last step),
    ``"10,15,20"`` (the range cut into equal sections, each strided to its count), or ``"ddimN"``
    (a fixed integer stride giving exactly N steps, as DDIM uses).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps from {num_timesteps} with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, taken = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the float stride (not k * stride): rounding then agrees with the reference
        # implementation at every count, so respaced step sets and published samples match.
        position = 0.0
        for _ in range(count):
            taken.append(start + round(position))
            position += stride
        start += size
    return set(taken)


def respace_betas(alphas_cumprod: np.ndarray, use_timesteps: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that jumps between the kept steps (same alpha-bar at each), and their original indices."""
    kept = np.array(sorted(use_timesteps), dtype=np.int64)
    acp = alphas_cumprod[kept]
    prev = np.append(1.0, acp[:-1])
    return 1.0 - acp / prev, kept
