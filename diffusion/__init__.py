"""Gaussian diffusion for DiT: ``create_diffusion`` with the same arguments and defaults as DiT's."""

from __future__ import annotations

from .gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from .schedule import get_named_beta_schedule, space_timesteps

__all__ = [
    "GaussianDiffusion", "LossType", "ModelMeanType", "ModelVarType", "create_diffusion",
    "get_named_beta_schedule", "space_timesteps",
]  # fmt: skip


def create_diffusion(
    timestep_respacing: str | int | list[int] | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The diffusion DiT trains and samples with; ``timestep_respacing`` "" or None keeps all steps,
    "250" keeps 250 evenly spaced ones, "ddim50" a DDIM stride (see ``space_timesteps``)."""
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        use_timesteps = None
    else:
        use_timesteps = space_timesteps(diffusion_steps, timestep_respacing)
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return GaussianDiffusion(
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        use_timesteps=use_timesteps,
    )
