"""train_masked_kd.py: the distillation terms, the massive-activation mask, a frozen teacher, layer
pairs, and real runs on the shared loop (learning, exact resume, 2-process torchrun)."""

import os
import subprocess
import sys

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
    # exactly equal outputs; the KL is 0 up to float rounding of (-1 + L2 - L1 + 1)
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
    args = kd_args(features, tmp_path, "--alpha-kd", "0.7", "--beta-feat", "0.5")
    objective = mkd.MaskedKD(student, teacher, [(0, 1), (1, 3)], args, max_steps=10)
    x, y = batch()
    for step, beta in [(0, 0.5), (4, 0.3), (10, 0.0)]:
        torch.manual_seed(step)
        t = objective(student, x, y, step=step)
        expected = 0.7 * (t["kd_mse"] + t["vb_kd"]) + 0.3 * (t["mse"] + t["vb"]) + beta * t["feat"]
        assert t["beta"].item() == pytest.approx(beta)
        torch.testing.assert_close(t["loss"], expected)


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
