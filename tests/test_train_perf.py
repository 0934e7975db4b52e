"""The training step's performance options keep its arithmetic: gradient accumulation, fused AdamW, the
on-device skip of non-finite steps, gradient checkpointing for every step kind, and the flags that select them."""

import argparse

import pytest
import torch

import prune_by_learning
import train as train_script
import train_masked_kd
from diffcompress.data import FeatureDataset
from diffcompress.distributed import DistInfo
from diffcompress.ema import create_ema
from diffcompress.trainer import (
    TrainingError,
    TrainStep,
    _SkipCounter,
    compile_blocks,
    diffusion_objective,
    make_optimizer,
    train,
)
from diffusion import create_diffusion
from models_with_layer_pruning import DiT

from .test_train import make_features

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=2, num_classes=4)
CPU = torch.device("cpu")


def deterministic_objective(model, x, y, step):
    """A loss without random draws (fixed timesteps, no label drop), so micro-batching changes nothing else."""
    t = (x.flatten(1)[:, 0].abs() * 1e4).long() % 1000  # per sample, whatever the micro-batch
    out = model(x, t, y, force_drop_ids=torch.zeros(len(x)))
    return {"loss": out.square().mean(), "first": out[:, 0].mean()}


def one_step(accum: int, objective=deterministic_objective, grad_clip=1.0, **model_kw):
    torch.manual_seed(0)
    model = DiT(**{**TINY, **model_kw})
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # adaLN-zero would give zero grads elsewhere
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    opt = make_optimizer([{"params": list(model.parameters())}], argparse.Namespace(lr=1e-2, weight_decay=0.01))
    opt.param_groups[0]["eps"] = 1e-4  # Adam's first step is ~sign(grad): keep it smooth where grads are ~0
    ema = create_ema(model)
    model.initial = {k: v.clone() for k, v in model.state_dict().items()}
    step = TrainStep(model, objective, opt, ema, device=CPU, precision="fp32", ema_decay=0.9,
                     grad_clip=grad_clip, accum_steps=accum)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    terms, skipped = step(x, y, 0)
    return model, ema, opt, terms, skipped


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_gives_the_update_of_one_big_batch(accum):
    big, big_ema, big_opt, big_terms, _ = one_step(1)
    micro, micro_ema, micro_opt, micro_terms, _ = one_step(accum)
    for (name, a), b in zip(big.named_parameters(), micro.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-8, msg=name)  # the summed (clipped) gradient
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    for a, b in zip(big_ema.parameters(), micro_ema.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for k in big_terms:  # the mean of equal-sized micro-batch means is the batch mean
        torch.testing.assert_close(micro_terms[k], big_terms[k], rtol=1e-5, atol=1e-7)
    assert (
        big.initial["blocks.0.attn.qkv.weight"] - big.blocks[0].attn.qkv.weight
    ).abs().max() > 1e-6  # an update really happened


def test_fused_adamw_matches_the_reference_update():
    """make_optimizer's fused AdamW gives the same update as torch's for-each AdamW."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = make_optimizer([{"params": params}], argparse.Namespace(lr=1e-2, weight_decay=0.1))
    reference = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=True)
    assert fused.defaults["fused"]
    for _ in range(3):
        for p, q in zip(params, twins):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_non_finite_step_is_skipped_on_the_device():
    def nan_objective(model, x, y, step):
        return {"loss": deterministic_objective(model, x, y, step)["loss"] * float("nan")}

    model, ema, opt, terms, skipped = one_step(1, objective=nan_objective)
    assert skipped.item() == 1.0 and torch.isnan(terms["loss"])
    assert all(torch.equal(model.initial[k], v) for k, v in model.state_dict().items())  # no update
    assert all(s["step"].item() == 0 and s["exp_avg"].abs().sum() == 0 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in ema.parameters())
    _, _, _, _, skipped = one_step(1)
    assert skipped.item() == 0.0


def test_skip_counter_reads_every_flag():
    counter = _SkipCounter(CPU)
    for step, flag in enumerate((0.0, 1.0, 1.0, 0.0)):
        counter.add(step, torch.tensor(flag), torch.zeros(2, dtype=torch.bool))
        counter.collect()
    assert (counter.total, counter.since_log, counter.pending) == (2, 2, [])


def kd_objective(student: DiT) -> train_masked_kd.MaskedKD:
    teacher = DiT(**{**TINY, "depth": 4})
    args = train_masked_kd.parse_args(["--data-path", "-", "--load-teacher", "-"])
    return train_masked_kd.MaskedKD(student, teacher, [(0, 1), (1, 3)], args, max_steps=10)


@pytest.mark.parametrize("kind", ["train", "kd", "prune-frozen", "prune-lora", "prune-full"])
def test_gradient_checkpointing_gives_the_same_step(kind):
    """Every step kind (train.py, Masked KD, the three pruning updates) trains alike with checkpointing."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        if kind == "train":
            model, objective, groups = DiT(**TINY), diffusion_objective(create_diffusion("")), None
        elif kind == "kd":
            model = DiT(**{**TINY, "depth": 2})
            objective, groups = kd_objective(model), None
        else:
            flags = {"prune-frozen": [], "prune-lora": ["--delta-w", "--lora"], "prune-full": ["--delta-w"]}[kind]
            ns = prune_by_learning.parse_args(["--data-path", "-", *flags])
            model, groups = prune_by_learning.configure_trainable(DiT(**TINY, groups="1:2"), ns)
            objective = prune_by_learning.pruning_objective(ns, max_steps=10)
        model.train().enable_gradient_checkpointing(checkpointing)
        groups = groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        opt = make_optimizer(groups, argparse.Namespace(lr=1e-3, weight_decay=0.0))
        step = TrainStep(model, objective, opt, None, device=CPU, precision="fp32", ema_decay=0.9, grad_clip=1.0)
        torch.manual_seed(5)  # the same draws (timesteps, noise, Gumbel samples) in both runs
        terms, _ = step(torch.randn(4, 4, 8, 8), torch.randint(0, 4, (4,)), 0)
        results.append((terms["loss"], {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, params_a), (loss_b, params_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for name in params_a:
        torch.testing.assert_close(params_b[name], params_a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_training_flags_reach_the_loop(tmp_path):
    features = make_features(tmp_path / "features", n=16)
    base = ["--model", "DiT-Ti/4", "--data-path", str(features), "--num-classes", "4", "--global-batch-size", "8",
            "--num-workers", "0", "--max-steps", "2", "--log-every", "1", "--ckpt-every", "100"]  # fmt: skip
    args = train_script.parse_args([*base, "--results-dir", str(tmp_path / "a"), "--grad-accum-steps", "4",
                                    "--grad-checkpointing"])  # fmt: skip
    result = train_script.main(args)
    assert result.train_steps == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    bad = train_script.parse_args([*base, "--results-dir", str(tmp_path / "b"), "--grad-accum-steps", "3"])
    with pytest.raises(TrainingError, match="--grad-accum-steps 3 must be a positive divisor of the per-rank batch 8"):
        train(bad, DistInfo(0, 0, 1, CPU), DiT(**TINY), diffusion_objective(create_diffusion("")),
              FeatureDataset(features))  # fmt: skip


def test_compile_blocks_keeps_outputs_and_state_dict_keys():
    """--compile's plumbing (the eager backend: inductor's C++ build is minutes on a small CPU)."""
    torch.manual_seed(0)
    model = DiT(**TINY).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 1])
    expected, keys = model(x, t, y), list(model.state_dict())
    compile_blocks(model, backend="eager")
    torch.testing.assert_close(model(x, t, y), expected)
    assert list(model.state_dict()) == keys
