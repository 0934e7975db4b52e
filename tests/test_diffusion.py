"""Gaussian diffusion: parity with the official numbers, and checks against independent computations."""

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusion import LossType, ModelMeanType, ModelVarType, create_diffusion, space_timesteps
from diffusion.gaussian_math import discretized_gaussian_log_likelihood, normal_kl

# ------------------------------------------------------------------------------------ parity with the fixtures


def test_schedule_matches_reference(reference):
    d, ref = create_diffusion(""), reference["diffusion"]
    assert np.abs(d.betas - ref["betas"].numpy()).max() < 1e-12
    assert np.abs(d.alphas_cumprod - ref["alphas_cumprod"].numpy()).max() < 1e-12
    assert np.allclose(d.betas, np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-15)  # the DDPM schedule


@pytest.mark.parametrize("steps", [250, 10])
def test_respacing_matches_reference(reference, steps):
    d, ref = create_diffusion(str(steps)), reference["diffusion"]
    assert np.array_equal(d.timestep_map, ref[f"timestep_map_{steps}"].numpy())
    assert np.abs(d.betas - ref[f"betas_{steps}"].numpy()).max() < 1e-12
    # independent property: the respaced process has the original alpha-bar at every kept step
    base = create_diffusion("")
    assert np.allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12, atol=0)


def test_q_sample_matches_reference(reference):
    ref = reference["diffusion"]
    xt = create_diffusion("").q_sample(ref["x0"], ref["t"], ref["noise"])
    assert (xt - ref["xt"]).abs().max().item() < 1e-5


def test_training_losses_match_reference(reference, reference_model):
    ref = reference["diffusion"]
    with torch.no_grad():
        terms = create_diffusion("").training_losses(
            reference_model, ref["x0"], ref["t"], dict(y=ref["y"]), noise=ref["noise"]
        )
    assert (terms["mse"] - ref["mse"]).abs().max().item() < 1e-5
    assert (terms["vb"] - ref["vb"]).abs().max().item() < 1e-4
    assert (terms["loss"] - ref["loss"]).abs().max().item() < 1e-4


def test_p_mean_variance_and_ddim_step_match_reference(reference, reference_model):
    ref, d = reference["diffusion"], create_diffusion("10")
    kwargs = dict(y=ref["y"])
    with torch.no_grad():
        out = d.p_mean_variance(reference_model, ref["p_x"], ref["p_t10"], clip_denoised=False, model_kwargs=kwargs)
        ddim = d.ddim_sample(reference_model, ref["p_x"], ref["p_t10"], clip_denoised=False, model_kwargs=kwargs)
    assert (out["mean"] - ref["p_mean"]).abs().max().item() < 1e-5
    assert (out["log_variance"] - ref["p_log_variance"]).abs().max().item() < 1e-5
    # x0 = x / sqrt(abar) - sqrt(1 / abar - 1) * eps: at late steps both terms reach ~300, so float32 rounding of
    # the model's matmuls (which differs across CPUs) leaves errors of a few ulps of 300 after the cancellation
    scale = ref["p_pred_xstart"].abs().max().item()
    torch.testing.assert_close(out["pred_xstart"], ref["p_pred_xstart"], rtol=0, atol=1e-6 * scale)
    assert (ddim["sample"] - ref["ddim_sample_eta0"]).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------ independent checks


def test_space_timesteps_variants():
    assert sorted(space_timesteps(1000, "10")) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert sorted(space_timesteps(100, "2,3")) == [0, 49, 50, 74, 99]
    for n in (1, 7, 25, 100, 250, 1000):
        steps = space_timesteps(1000, n)
        assert len(steps) == n and 0 in steps and (n == 1 or 999 in steps)
    with pytest.raises(ValueError, match="cannot take 1001 steps"):
        space_timesteps(1000, 1001)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(100, generator=g, dtype=torch.float64) for _ in range(4))
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_discretized_likelihood_is_a_distribution_over_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.1, -3.0), (-0.7, -1.0), (0.95, -5.0)]:
        means, scales = torch.full_like(bins, mean), torch.full_like(bins, log_scale)
        p = discretized_gaussian_log_likelihood(bins, means, scales).exp()
        assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
        centre = int(np.argmin(np.abs(bins.numpy() - mean)))  # a middle bin vs scipy's exact normal
        if 0 < centre < 255:
            s = np.exp(log_scale)
            exact = norm.cdf(bins[centre] + 1 / 255, mean, s) - norm.cdf(bins[centre] - 1 / 255, mean, s)
            assert p[centre].item() == pytest.approx(exact, rel=2e-3)


def test_q_sample_moments():
    d = create_diffusion("")
    x0 = torch.full((20000, 1), 0.5)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t)
    abar = d.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(np.sqrt(abar) * 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.05)


class OracleEps:
    """A 'model' that knows x0: it returns the exact noise, plus a variance value v (learned range)."""

    def __init__(self, x0, v=None):
        self.x0, self.v, self.base, self.seen = x0, v, create_diffusion(""), set()

    def __call__(self, x, t, y=None):
        self.seen.update(t.tolist())
        abar = torch.tensor(self.base.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
        eps = (x - abar.sqrt() * self.x0) / (1 - abar).sqrt()
        return eps if self.v is None else torch.cat([eps, torch.full_like(eps, self.v)], dim=1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_recover_x0_with_an_oracle(sampler):
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    d = create_diffusion("25", learn_sigma=False)
    oracle = OracleEps(x0)
    loop = d.p_sample_loop if sampler == "ddpm" else d.ddim_sample_loop
    out = loop(oracle, x0.shape, clip_denoised=False, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert oracle.seen == set(d.timestep_map.tolist())  # the model saw the original timesteps


def test_vb_is_zero_for_the_true_posterior():
    x0 = torch.rand(4, 3, 4, 4) * 2 - 1
    t = torch.tensor([1, 10, 400, 999])
    d = create_diffusion("")
    terms = d.training_losses(OracleEps(x0, v=-1.0), x0, t)  # v=-1 selects the posterior variance
    assert terms["mse"].abs().max().item() < 1e-8
    assert terms["vb"].abs().max().item() < 1e-4
    # v=+1 selects beta_t: same mean, so the KL is the closed form between the two variances, in bits
    wrong = d.training_losses(OracleEps(x0, v=1.0), x0, t)["vb"]
    ratio = d.posterior_variance[t[1:].numpy()] / d.betas[t[1:].numpy()]
    expected = 0.5 * (ratio - 1 - np.log(ratio)) / np.log(2)
    np.testing.assert_allclose(wrong[1:].numpy(), expected, rtol=1e-3, atol=1e-6)
    assert wrong[1].item() > 1e-3


def test_vb_gradient_reaches_only_the_variance_channels():
    x0, t = torch.randn(2, 3, 4, 4), torch.tensor([5, 500])
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    d = create_diffusion("")
    d.training_losses(lambda x, t: out, x0, t)["vb"].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0


def test_generator_makes_sampling_reproducible():
    d = create_diffusion("5")
    model = lambda x, t: torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)
    a = d.p_sample_loop(model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(3), progress=True)
    b = d.p_sample_loop(model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    c = d.p_sample_loop(model, (2, 3, 4, 4), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_create_diffusion_options():
    assert create_diffusion("").loss_type == LossType.MSE
    assert create_diffusion("", use_kl=True).loss_type == LossType.RESCALED_KL
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    assert create_diffusion("", learn_sigma=False).model_var_type == ModelVarType.FIXED_LARGE
    assert create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    assert create_diffusion("", predict_xstart=True).model_mean_type == ModelMeanType.START_X
    assert create_diffusion(None).num_timesteps == 1000
    x0 = torch.randn(2, 3, 4, 4)
    xstart = create_diffusion("", predict_xstart=True, learn_sigma=False)
    terms = xstart.training_losses(lambda x, t: x0, x0, torch.tensor([3, 900]))
    assert terms["loss"].abs().max().item() == 0  # the x0 target, predicted exactly


def test_dpm_solver_recovers_x0_with_an_oracle():
    from diffusion.dpm_solver import dpm_solver_sample_loop

    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    oracle = OracleEps(x0, v=0.0)  # learned-variance layout: only the first 3 channels are used
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = dpm_solver_sample_loop(oracle, create_diffusion(""), noise, num_steps=20)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-3)
    assert len(oracle.seen) == 20 and max(oracle.seen) > 900  # 20 original timesteps across the range
    with pytest.raises(ValueError, match="full training diffusion"):
        dpm_solver_sample_loop(oracle, create_diffusion("10"), noise, num_steps=5)
