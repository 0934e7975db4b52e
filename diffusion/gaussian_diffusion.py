"""Gaussian diffusion (DDPM / IDDPM / ADM), written from the equations.

Forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). The model predicts epsilon (or x_0)
and, with a learned-range variance, a per-element interpolation v in [-1, 1] between log(beta_t) and
the clipped log posterior variance. Training minimises MSE(eps) plus the variational bound with the
mean detached (IDDPM's hybrid loss). A respaced process keeps a subset of the steps; its model wrapper
maps the respaced indices back to the original timesteps the network was trained on.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np
import torch

from diffcompress.progress import progress_bar

from .gaussian_math import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    PREVIOUS_X = enum.auto()  # the model predicts x_{t-1}
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # the model outputs log-variance
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # the model interpolates between the two (IDDPM)


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE, plus the VB term when the variance is learned
    RESCALED_MSE = enum.auto()  # same, with the VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the bound times num_timesteps (as the sum over steps)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


class GaussianDiffusion:
    """A diffusion process over the steps ``use_timesteps`` of the base schedule ``betas``.

    ``use_timesteps=None`` keeps every step. Sampling and losses take ``model(x, t, **model_kwargs)``
    with ``t`` in 0..num_timesteps-1 (respaced indices); the model itself is called with the original
    timesteps ``timestep_map[t]``.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        use_timesteps: set[int] | None = None,
    ):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.original_num_steps = len(betas)
        betas = np.asarray(betas, dtype=np.float64)
        if use_timesteps is None:
            self.timestep_map = np.arange(len(betas), dtype=np.int64)
        else:
            from .schedule import respace_betas

            betas, self.timestep_map = respace_betas(np.cumprod(1.0 - betas), use_timesteps)
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0: clip the log with the value at t=1.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # FIXED_LARGE uses beta_t, but the posterior variance at t=0 for a better decoder likelihood.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ helpers
    def _extract(self, name: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Gather table ``name`` at ``t`` as float32 on t's device, shaped to broadcast against ``shape``."""
        key = (name, t.device)
        table = self._tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(t.device)
            table = self._tables[key] = table.float() if table.is_floating_point() else table
        return table[t].view(-1, *([1] * (len(shape) - 1)))

    def _wrap_model(self, model: Callable) -> Callable:
        if self.num_timesteps == self.original_num_steps:
            return model

        def respaced(x, ts, **kwargs):
            return model(x, self._extract("timestep_map", ts, ts.shape), **kwargs)

        return respaced

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("alphas_cumprod", t, x_start.shape).neg().add(1.0).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.shape).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.shape).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance(
        self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        denoised_fn: Callable | None = None, model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Predict p(x_{t-1} | x_t): dict with mean, variance, log_variance, pred_xstart (and extra)."""
        model_output = self._wrap_model(model)(x, t, **(model_kwargs or {}))
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        return {**self.p_from_output(model_output, x, t, clip_denoised, denoised_fn), "extra": extra}

    def p_from_output(self, model_output, x, t, clip_denoised=True, denoised_fn=None) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output already computed (shared by sampling and the VB loss)."""
        C = x.shape[1]
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * C:
                raise ValueError(
                    f"a learned variance needs {2 * C} output channels, the model gave {model_output.shape[1]}"
                )
            model_output, var_values = model_output[:, :C], model_output[:, C:]
            if self.model_var_type == ModelVarType.LEARNED:
                log_variance = var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (var_values + 1) / 2  # v in [-1, 1] -> interpolation weight
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                var_name, log_name = "fixed_large_variance", "fixed_large_log_variance"
            else:
                var_name, log_name = "posterior_variance", "posterior_log_variance_clipped"
            variance = self._extract(var_name, t, x.shape).expand_as(x)
            log_variance = self._extract(log_name, t, x.shape).expand_as(x)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            raise NotImplementedError("predicting x_{t-1} directly is not supported; use epsilon or x_0")
        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = model_output
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t.shape
        )

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by the variance-scaled gradient of log p(y | x) (classifier guidance)."""
        gradient = cond_fn(x, self._extract("timestep_map", t, t.shape), **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    @staticmethod
    def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """One ancestral step x_t -> x_{t-1} (no noise at t=0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = self._noise_like(x, generator)
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs)
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        device=None, progress=False, generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Ancestral sampling from pure noise (or ``noise``) to x_0."""
        (final,) = deque(
            self.p_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, generator
            ),
            maxlen=1,
        )  # keep only the last step
        return final["sample"]

    def p_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        device=None, progress=False, generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
        def step(x, t):
            return self.p_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, generator)

        yield from self._loop(step, shape, noise, device, progress, generator)

    def ddim_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """One DDIM step x_t -> x_{t-1}; eta=0 is deterministic, eta=1 matches DDPM's variance."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        if cond_fn is not None:
            out = self._condition_score(cond_fn, out, x, t, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract("alphas_cumprod", t, x.shape)
        abar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean_pred = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.dim() - 1)))
        sample = mean_pred + nonzero * sigma * self._noise_like(x, generator) if eta > 0 else mean_pred
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Classifier guidance for DDIM: move epsilon along the score of the classifier."""
        abar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - abar).sqrt() * cond_fn(x, self._extract("timestep_map", t, t.shape), **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x, t)
        return out

    def ddim_sample_loop(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        device=None, progress=False, eta=0.0, generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # fmt: skip
        (final,) = deque(
            self.ddim_sample_loop_progressive(
                model, shape, noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, device, progress, eta, generator
            ),
            maxlen=1,
        )
        return final["sample"]

    def ddim_sample_loop_progressive(
        self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
        device=None, progress=False, eta=0.0, generator: torch.Generator | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
        def step(x, t):
            return self.ddim_sample(model, x, t, clip_denoised, denoised_fn, cond_fn, model_kwargs, eta, generator)

        yield from self._loop(step, shape, noise, device, progress, generator)

    def _loop(self, step, shape, noise, device, progress, generator) -> Iterator[dict[str, torch.Tensor]]:
        if device is None:
            device = noise.device if noise is not None else torch.device("cpu")
        x = noise if noise is not None else torch.randn(*shape, generator=generator, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        for i in progress_bar(indices, desc="sampling", leave=False) if progress else indices:
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            with torch.no_grad():  # not inference_mode: a cond_fn may need grads; not around the yield
                out = step(x, t)
            yield out
            x = out["sample"]

    # ------------------------------------------------------------------ training
    def _vb_terms_bpd(
        self, model_output, x_start, x_t, t, clip_denoised=False, target: tuple[torch.Tensor, ...] | None = None
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound, in bits per dimension: KL for t > 0, decoder NLL at t = 0.

        ``target`` (mean, log_variance) replaces the true posterior q(x_{t-1} | x_t, x_0) in the KL (a
        teacher's p(x_{t-1} | x_t) in distillation); the decoder NLL at t = 0 always scores x_0 itself.
        """
        if target is None:
            true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        else:
            true_mean, true_log_var = target
        out = self.p_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / np.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self, model: Callable, x_start: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Per-sample losses: ``loss`` and, for the MSE family, ``mse`` and (learned variance) ``vb``.

        The VB term sees the predicted mean detached, so it trains only the variance channels.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = self._wrap_model(model)(x_t, t, **(model_kwargs or {}))
        return self.losses_from_output(model_output, x_start, x_t, t, noise)

    def losses_from_output(self, model_output, x_start, x_t, t, noise) -> dict[str, torch.Tensor]:
        """The loss terms of ``training_losses`` from a model output already computed."""
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model_output, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms
        C = x_t.shape[1]
        prediction = model_output
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            prediction = model_output[:, :C]
            frozen = torch.cat([prediction.detach(), model_output[:, C:]], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        if self.model_mean_type == ModelMeanType.EPSILON:
            target = noise
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = self.q_posterior_mean_variance(x_start, x_t, t)[0]
        terms["mse"] = mean_flat((target - prediction) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def distillation_losses_from_output(
        self, student_output, teacher_output, x_start, x_t, t, noise
    ) -> dict[str, torch.Tensor]:
        """Per-sample terms of output distillation (TinyFusion's Masked KD, built on ``training_losses``).

        ``mse``, ``vb`` (and ``loss``) are ``losses_from_output``'s for the student. ``kd_mse`` is the MSE
        between the student's and the teacher's predictions (the first C channels). With a learned variance,
        ``vb_kd`` is ``vb`` with the teacher's p(x_{t-1} | x_t) in place of the true posterior: the KL from
        the teacher's Gaussian to the student's (student mean detached, so it trains the variance channels)
        for t > 0, and at t = 0 the decoder NLL of x_0 under the student's Gaussian, i.e. the same value as
        ``vb`` there, as in the authors' code.
        """
        terms = self.losses_from_output(student_output, x_start, x_t, t, noise)
        C = x_t.shape[1]
        terms["kd_mse"] = mean_flat((student_output[:, :C] - teacher_output[:, :C]) ** 2)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE) and not self.loss_type.is_vb():
            teacher = self.p_from_output(teacher_output, x_t, t, clip_denoised=False)
            frozen = torch.cat([student_output[:, :C].detach(), student_output[:, C:]], dim=1)
            target = (teacher["mean"], teacher["log_variance"])
            terms["vb_kd"] = self._vb_terms_bpd(frozen, x_start, x_t, t, target=target)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb_kd"] = terms["vb_kd"] * (self.num_timesteps / 1000.0)
        return terms
