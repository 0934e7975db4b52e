"""DPM-Solver++ (2M) sampling of an epsilon model trained on this package's schedule, through diffusers.

20-25 steps instead of DDPM's 250. The scheduler gets the exact training betas, and the model is
called with original timesteps (0..999), so any DiT trained here or in the original repository works.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffcompress.progress import progress_bar

from .gaussian_diffusion import GaussianDiffusion


def dpm_solver_sample_loop(
    model: Callable, diffusion: GaussianDiffusion, noise: torch.Tensor, num_steps: int = 25,
    model_kwargs: dict | None = None, progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Sample from ``noise`` in ``num_steps`` DPM-Solver++ steps; only the first C output channels (epsilon)
    of ``model`` are used. ``diffusion`` must be the un-respaced training process (its betas)."""
    from diffusers import DPMSolverMultistepScheduler

    if diffusion.num_timesteps != diffusion.original_num_steps:
        raise ValueError("dpm-solver needs the full training diffusion (create_diffusion('')), not a respaced one")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.num_timesteps, trained_betas=diffusion.betas, prediction_type="epsilon",
        algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
    )  # fmt: skip
    scheduler.set_timesteps(num_steps, device=noise.device)
    x, channels = noise, noise.shape[1]
    steps = scheduler.timesteps
    with torch.no_grad():
        for t in progress_bar(steps, desc="sampling", leave=False) if progress else steps:
            out = model(x, t.expand(x.shape[0]).to(noise.device), **(model_kwargs or {}))
            x = scheduler.step(out[:, :channels].to(x.dtype), t, x).prev_sample
    return x
