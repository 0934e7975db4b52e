"""train_masked_kd.py: the distillation terms, the massive-activation mask, a frozen teacher, layer
pairs, and real runs on the shared loop (learning, exact resume, 2-process torchrun)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train_masked_kd as mkd
from diffcompress.checkpoint import load_file, save_pruned
from diffcompress.data import FeatureDataset
from diffcompress.trainer import train
from models_with_layer_pruning import DiT, create_model, pruned_state_dict

from .conftest import CPU, ROOT, TOY_DIT, TOY_FLAGS
from .test_model import randomized
from .test_train import fit_tiny_dit, free_port, make_features


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return make_features(tmp_path_factory.mktemp("features"), n=64)


@pytest.fixture(scope="module")
def trained_teacher(features, tmp_path_factory):
    """A 4-block DiT fitted to the toy set, so distillation and the data agree."""
    torch.manual_seed(0)
    return fit_tiny_dit(DiT(**TOY_DIT, depth=4), features, tmp_path_factory.mktemp("t"))


def kd_args(features, results, *extra):
    return mkd.parse_args(["--data-path", str(features), "--results-dir", str(results), "--load-teacher", "unused",
                           *TOY_FLAGS, *extra])  # fmt: skip


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_kd_terms_vanish_for_identical_student_and_teacher(features, tmp_path):
    torch.manual_seed(0)
    student = randomized(DiT(**TOY_DIT, depth=4, class_dropout_prob=0.5)).train()
    teacher = randomized(DiT(**TOY_DIT, depth=4, class_dropout_prob=0.5))
    objective = mkd.MaskedKD(student, teacher, [(0, 0), (3, 3)], kd_args(features, tmp_path), max_steps=10)
    x, y = batch()
    terms = objective(student, x, y, step=0)  # random label drops: the teacher must see the same ones
    # exactly equal outputs; the KL is 0 up to float rounding of (-1 + L2 - L1 + 1) (no t = 0 drawn here: the
    # VB-KD term is the decoder NLL there, not 0)
    assert terms["kd_mse"].item() == 0 and terms["feat"].item() == 0 and abs(terms["vb_kd"].item()) < 1e-7
    assert terms["mse"].item() > 0 and terms["vb"].item() > 0
    other = randomized(DiT(**TOY_DIT, depth=4, class_dropout_prob=0.5), seed=5)
    objective = mkd.MaskedKD(student, other, [(0, 0)], kd_args(features, tmp_path), max_steps=10)
    terms = objective(student, x, y, step=0)
    assert terms["kd_mse"].item() > 0 and terms["vb_kd"].item() > 0 and terms["feat"].item() > 0


def test_loss_combines_the_terms_with_alpha_and_a_decaying_beta(features, tmp_path):
    torch.manual_seed(0)
    student = randomized(DiT(**TOY_DIT, depth=2)).train()
    teacher = randomized(DiT(**TOY_DIT, depth=4), seed=3)
    x, y = batch()
    for schedule, steps_per_epoch, betas in [
        ("step", None, [(0, 0.5), (4, 0.3)]),
        ("epoch", 4, [(4, 0.5 * 2 / 3), (9, 0.5 / 3)]),
    ]:
        args = kd_args(features, tmp_path, "--alpha-kd", "0.7", "--beta-feat", "0.5", "--beta-schedule", schedule)
        objective = mkd.MaskedKD(
            student, teacher, [(0, 1), (1, 3)], args, max_steps=10, steps_per_epoch=steps_per_epoch
        )
        for step, beta in betas:
            torch.manual_seed(step)
            t = objective(student, x, y, step=step)
            expected = 0.7 * (t["kd_mse"] + t["vb_kd"]) + 0.3 * (t["mse"] + t["vb"]) + beta * t["feat"]
            assert t["beta"].item() == pytest.approx(beta), (schedule, step)
            torch.testing.assert_close(t["loss"], expected)
    assert kd_args(features, tmp_path).beta_schedule == "epoch"  # the authors' default
    # 10 steps of 4 per epoch span 3 epochs: beta 0.5 * (1 - e / 3), constant within each epoch
    epochs = [mkd.feature_weight(0.5, step, 10, 4, "epoch") for step in range(10)]
    assert epochs == pytest.approx([0.5] * 4 + [0.5 * 2 / 3] * 4 + [0.5 / 3] * 2)
    steps = [mkd.feature_weight(0.5, step, 10, 4, "step") for step in range(11)]
    assert steps == pytest.approx([0.5 * (1 - s / 10) for s in range(11)])
    assert mkd.feature_weight(0.5, 5, 10, None, "epoch") == 0.5  # no epoch length: one epoch, no decay


# ------------------------------------------------------------------- every term against the formulas (numpy)


def _np_schedule():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))  # clipped: the variance is 0 at t = 0
    coef1, coef2 = betas * np.sqrt(abar_prev) / (1 - abar), (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)
    return dict(betas=betas, abar=abar, post_log_var=post_log_var, coef1=coef1, coef2=coef2)


def _np_p(out, x_t, t, sc):
    """Mean and log-variance of p(x_{t-1} | x_t) for an epsilon / learned-range output (IDDPM eqs. 10-15)."""
    col = lambda a: a[t][:, None, None, None]  # noqa: E731
    eps, v = out[:, :4], out[:, 4:]
    x0 = x_t / np.sqrt(col(sc["abar"])) - np.sqrt(1 / col(sc["abar"]) - 1) * eps
    frac = (v + 1) / 2
    log_var = frac * np.log(col(sc["betas"])) + (1 - frac) * col(sc["post_log_var"])
    return col(sc["coef1"]) * x0 + col(sc["coef2"]) * x_t, log_var


def _np_kl_bits(m1, lv1, m2, lv2):
    kl = 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
    return kl.reshape(len(kl), -1).mean(1) / np.log(2)


def _np_decoder_nll_bits(x0, mean, log_var):
    """-log of the probability of x0's 8-bit bin under N(mean, exp(log_var)), tanh-approximated CDF (ADM)."""
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    inv_std = np.exp(-0.5 * log_var)
    plus, minus = cdf(inv_std * (x0 - mean + 1 / 255)), cdf(inv_std * (x0 - mean - 1 / 255))
    log = lambda p: np.log(np.maximum(p, 1e-12))  # noqa: E731
    log_p = np.where(x0 < -0.999, log(plus), np.where(x0 > 0.999, log(1 - minus), log(plus - minus)))
    return -log_p.reshape(len(x0), -1).mean(1) / np.log(2)


def _np_masked(h, k):
    flat = h.reshape(len(h), -1)
    mean, std = flat.mean(1), flat.std(1, ddof=1)  # torch.std: unbiased
    shape = (-1,) + (1,) * (h.ndim - 1)
    return np.where(np.abs(h - mean.reshape(shape)) >= k * std.reshape(shape), 0.0, h)


@pytest.mark.parametrize("timesteps", [[0, 0, 0, 0], [0, 1, 500, 999]], ids=["t=0", "mixed"])
def test_every_term_matches_the_formulas(reference, reference_model, features, tmp_path, timesteps):
    teacher = reference_model  # the official DiT code's tiny model (conftest); the student: 2 random blocks
    student = randomized(DiT(**{**reference["config"], "depth": 2}), seed=1).eval()  # eval: no label drop
    pairs = [(0, 1), (1, 3)]
    args = kd_args(features, tmp_path, "--alpha-kd", "0.8", "--beta-feat", "0.3", "--beta-schedule", "step")
    objective = mkd.MaskedKD(student, teacher, pairs, args, max_steps=10)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 4, 8, 8, generator=g)  # beyond +-1 too: both edge bins of the decoder NLL are used
    noise, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([1, 3, 5, 7])
    t = torch.tensor(timesteps)
    got = objective.losses(student, x0, y, t, noise, step=5)

    # the models' outputs and block features, taken by hooks of the test's own, then everything in float64
    feats = {}

    def keep(key):
        return lambda module, inputs, output: feats.__setitem__(key, output.double().numpy())

    hooks = [m.blocks[i].register_forward_hook(keep((w, i)))
             for w, m, idx in [("s", student, 0), ("t", teacher, 1)] for i in {p[idx] for p in pairs}]  # fmt: skip
    sc, tn = _np_schedule(), t.numpy()
    ab = sc["abar"][tn][:, None, None, None]
    x0n, noisen = x0.double().numpy(), noise.double().numpy()
    x_t = np.sqrt(ab) * x0n + np.sqrt(1 - ab) * noisen
    with torch.no_grad():
        out_s = student(torch.from_numpy(x_t).float(), t, y).double().numpy()
        out_t = teacher(torch.from_numpy(x_t).float(), t, y).double().numpy()
    for h in hooks:
        h.remove()
    per_sample = lambda a: a.reshape(len(a), -1).mean(1)  # noqa: E731
    mse = per_sample((noisen - out_s[:, :4]) ** 2)
    kd_mse = per_sample((out_t[:, :4] - out_s[:, :4]) ** 2)
    mean_s, lv_s = _np_p(out_s, x_t, tn, sc)
    mean_t, lv_t = _np_p(out_t, x_t, tn, sc)
    c1, c2 = sc["coef1"][tn][:, None, None, None], sc["coef2"][tn][:, None, None, None]
    post_lv = sc["post_log_var"][tn][:, None, None, None] + np.zeros_like(x0n)
    nll = _np_decoder_nll_bits(x0n, mean_s, lv_s)
    vb = np.where(tn == 0, nll, _np_kl_bits(c1 * x0n + c2 * x_t, post_lv, mean_s, lv_s))
    kl_teacher = _np_kl_bits(mean_t, lv_t, mean_s, lv_s)
    vb_kd = np.where(tn == 0, nll, kl_teacher)  # the authors': the decoder NLL at t = 0, as in DiT's VB
    feat = np.mean([((_np_masked(feats[("s", s)], 2.0) - _np_masked(feats[("t", tt)], 2.0)) ** 2).mean()
                    for s, tt in pairs])  # fmt: skip
    beta = 0.3 * (1 - 5 / 10)
    loss = 0.8 * (kd_mse.mean() + vb_kd.mean()) + 0.2 * (mse.mean() + vb.mean()) + beta * feat

    expected = dict(mse=mse.mean(), kd_mse=kd_mse.mean(), vb=vb.mean(), vb_kd=vb_kd.mean(), feat=feat, beta=beta,
                    loss=loss)  # fmt: skip
    for name, value in expected.items():
        assert got[name].item() == pytest.approx(value, rel=2e-5, abs=1e-7), name
    assert 0 < feat and all(v > 0 for v in (mse.mean(), kd_mse.mean(), vb.mean()))
    masked = sum((_np_masked(feats[k], 2.0) == 0).sum() for k in feats)
    assert masked > 0  # the 2-std mask is exercised
    if timesteps[0] == timesteps[-1] == 0:
        # the fix: at t = 0 the VB-KD term is the decoder NLL, far from the teacher-student KL used before
        assert got["vb_kd"].item() == pytest.approx(got["vb"].item(), rel=1e-6)
        assert abs(vb_kd.mean() - kl_teacher.mean()) > 0.1 * vb_kd.mean()


def test_planted_massive_activation_is_masked():
    g = torch.Generator().manual_seed(0)
    student = torch.rand(2, 16, 64, generator=g) * 2 - 1  # bounded: nothing is 2 std from the mean
    teacher = torch.rand(2, 16, 64, generator=g) * 2 - 1
    planted = teacher.clone()
    planted[0, 3, 5] = 1e4
    n = student.numel()
    clean, massive = mkd.masked_feature_loss(student, teacher, 2.0), mkd.masked_feature_loss(student, planted, 2.0)
    # only the planted position changes: its term goes from (s - t)^2 to (s - 0)^2
    s, t = student[0, 3, 5], teacher[0, 3, 5]
    torch.testing.assert_close((massive - clean) * n, s**2 - (s - t) ** 2, rtol=1e-4, atol=1e-4)
    assert massive.item() < 2.0
    unmasked = mkd.masked_feature_loss(student, planted, 0.0)
    assert unmasked.item() > 1e8 / n * 0.99  # without the mask, the one activation dominates
    assert mkd.mask_massive(planted, 2.0)[0, 3, 5] == 0 and mkd.mask_massive(planted, 2.0)[1].equal(planted[1])


def test_default_layer_pairs():
    meta = {"groups": [[1, 2]] * 7, "kept_indices": [1, 2, 5, 7, 8, 11, 13]}
    assert mkd.default_pairs(meta, 7, 14) == [(i, 2 * i + 1) for i in range(7)]
    meta = {"groups": [[2, 4], [2, 4], [1, 2]], "kept_indices": [0, 3, 5, 6, 9]}
    assert mkd.default_pairs(meta, 5, 10) == [(1, 3), (3, 7), (4, 9)]
    assert mkd.default_pairs(None, 14, 28) == [(i, 2 * i + 1) for i in range(14)]  # the paper's mapping
    assert mkd.default_pairs({"kept_indices": [0, 5]}, 7, 28) == [(i, 4 * i + 3) for i in range(7)]
    assert mkd.parse_pairs("0:1, 1:3", 2, 4) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match="out of range"):
        mkd.parse_pairs("0:1,2:3", 2, 4)
    with pytest.raises(ValueError, match="expected 'student:teacher'"):
        mkd.parse_pairs("0-1", 2, 4)


def distill(features, results, student, teacher, *extra):
    args = kd_args(features, results, "--lr", "1e-3", "--lr-min", "1e-3", "--log-every", "5", *extra)
    objective = mkd.MaskedKD(student, teacher, mkd.default_pairs(None, student.depth, teacher.depth), args, 30)
    return train(args, CPU, student, objective, FeatureDataset(features))


def test_student_learns_and_teacher_stays_frozen(features, trained_teacher, tmp_path):
    teacher = trained_teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = DiT(**TOY_DIT, depth=2)
    student.load_state_dict(pruned_state_dict(teacher.state_dict(), [1, 3]))
    result = distill(features, tmp_path, student, teacher, "--max-steps", "30")
    kd = [r["kd_mse"] for r in result.history]
    assert kd[-1] < 0.7 * kd[0], kd
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training
    assert {"kd_mse", "vb_kd", "mse", "vb", "feat", "beta"} <= set(result.history[0])


def test_exact_resume(features, tmp_path):
    torch.manual_seed(0)
    teacher = randomized(DiT(**TOY_DIT, depth=4))
    init = pruned_state_dict(teacher.state_dict(), [1, 3])

    def student():
        model = DiT(**TOY_DIT, depth=2)
        model.load_state_dict(init)
        return model

    straight = distill(features, tmp_path / "a", student(), teacher, "--max-steps", "6", "--ckpt-every", "3")
    middle = tmp_path / "a" / "masked-kd-DiT-D14-2" / "checkpoints" / "0000003.pt"
    resumed = distill(features, tmp_path / "b", student(), teacher, "--max-steps", "6", "--resume", str(middle))
    a, b = load_file(straight.checkpoint), load_file(resumed.checkpoint)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_torchrun_two_processes(features, tmp_path):
    torch.manual_seed(0)
    teacher = randomized(create_model("DiT-Ti/4", input_size=8, num_classes=4))
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    kept = [2 * i + (i % 2) for i in range(6)]  # one block of each 1:2 pair
    save_pruned(pruned_state_dict(teacher.state_dict(), kept), tmp_path / "student.pt", kept, "DiT-Ti/4",
                groups=[[1, 2]] * 6)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "train_masked_kd.py"), "--model", "DiT-Ti/4", "--depth", "6",
           "--load-weight", str(tmp_path / "student.pt"), "--teacher", "DiT-Ti/4", "--load-teacher",
           str(tmp_path / "teacher.pt"), "--data-path", str(features), "--results-dir", str(tmp_path), *TOY_FLAGS,
           "--max-steps", "4", "--log-every", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "feature pairs (student:teacher): 0:1,1:3,2:5,3:7,4:9,5:11" in result.stdout
    assert "kd_mse=" in result.stdout and "feat=" in result.stdout
    state = load_file(tmp_path / "masked-kd-DiT-Ti-4" / "checkpoints" / "0000004.pt")
    assert {"model", "ema", "opt", "sched", "train_steps", "args"} <= set(state)
    assert not any(k.startswith("teacher") for k in state["model"])  # the teacher is not saved


def test_the_authors_flags(tmp_path, script):
    """--vae is checked against the features' manifest; --strict (loading is always strict) and --strong-aug
    (a note: latents have only the flip view, always drawn) are accepted."""
    import json

    data = make_features(tmp_path / "features", n=16)
    (data / "manifest.json").write_text(json.dumps({"vae": "ema"}))
    torch.manual_seed(0)
    torch.save(randomized(create_model("DiT-Ti/4", input_size=8, num_classes=4)).state_dict(), tmp_path / "teacher.pt")
    common = ["--model", "DiT-Ti/4", "--depth", "2", "--teacher", "DiT-Ti/4", "--load-teacher", tmp_path / "teacher.pt",
              "--data-path", data, "--results-dir", tmp_path / "out", *TOY_FLAGS, "--max-steps", "1",
              "--device", "cpu"]  # fmt: skip
    for vae, line in [
        ("mse", f"error: --vae mse: the features in {data} were encoded with --vae ema; pass --vae ema"),
        ("emma", "error: --vae emma: expected ema, mse, none or a local VAE folder"),
    ]:
        result = script("train_masked_kd.py", *common, "--vae", vae)
        assert result.code == 2 and result.last_line.startswith(line), result.err
    # the hub id of ema is the same VAE
    result = script("train_masked_kd.py", *common, "--vae", "stabilityai/sd-vae-ft-ema", "--strict", "--strong-aug")
    assert result.code == 0, result.err
    assert "--strong-aug: the features are latents" in result.out
    assert mkd.parse_args(["--load-teacher", "t.pt", "--data-path", "f", "--vae", "mse"]).vae == "mse"
