"""Benchmarks stay runnable, and their analytic FLOP counts agree with torch's own FLOP counter."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import prune_by_learning
from bench import ab, evaluator, sampling, training
from bench.common import dit_forward_flops, dit_step_flops
from models_with_layer_pruning import create_model


@pytest.mark.parametrize("name,size", [("DiT-XL/2", 32), ("DiT-D14/2", 32), ("DiT-S/4", 16)])
def test_analytic_forward_flops_match_torch_flop_counter(name, size):
    with torch.device("meta"):  # full size without memory or time
        model = create_model(name, input_size=size, num_classes=1000)
        x, t, y = torch.randn(2, 4, size, size), torch.rand(2), torch.zeros(2, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, y)
    assert dit_forward_flops(model, batch=2) == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_sampling_benchmark_runs_and_reports_speedups(tmp_path):
    out = tmp_path / "sampling.json"
    args = sampling.parse_args(["--models", "DiT-S/8", "DiT-Ti/8", "--samplers", "ddim", "dpm-solver",
                                "--image-size", "64", "--batch-size", "2", "--timed-steps", "2",
                                "--matmul-size", "256", "--device", "cpu", "--json-out", str(out)])  # fmt: skip
    rows = sampling.main(args)
    assert [(r["model"], r["sampler"]) for r in rows] == [
        ("DiT-S/8", "ddim"),
        ("DiT-Ti/8", "ddim"),
        ("DiT-S/8", "dpm-solver"),
        ("DiT-Ti/8", "dpm-solver"),
    ]
    assert all(r["it_s"] > 0 and r["tflops"] > 0 for r in rows)
    assert rows[0]["speedup"] == 1.0 and rows[2]["speedup"] == 1.0
    assert rows[1]["img_s"] == pytest.approx(2 * rows[1]["it_s"] / 250)
    assert json.loads(out.read_text())["rows"] == rows


@pytest.mark.parametrize("mode", ["full", "frozen", "delta_w", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_analytic_step_flops_match_torch_flop_counter(mode, checkpointing):
    """Forward + backward (+ recompute) as autograd runs them, for the model each step kind trains."""
    with torch.device("meta"):
        model = create_model(
            "DiT-S/2", input_size=16, num_classes=1000, depth=4, groups=None if mode == "full" else "1:2"
        )
        if mode != "full":
            flags = {"frozen": [], "delta_w": ["--delta-w"], "lora": ["--delta-w", "--lora", "--lora-rank", "4"]}[mode]
            model, _ = prune_by_learning.configure_trainable(
                model, prune_by_learning.parse_args(["--data-path", "-", *flags])
            )
        model.train().enable_gradient_checkpointing(checkpointing)
        x, t, y = torch.randn(2, 4, 16, 16), torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
        with FlopCounterMode(display=False) as counter:
            model(x, t, y).square().mean().backward()
    assert dit_step_flops(model, 2, mode, checkpointing, lora_rank=4) == pytest.approx(
        counter.get_total_flops(), rel=1e-3
    )


@pytest.mark.slow  # a whole pipeline end to end
def test_training_benchmark_runs_every_step_kind(tmp_path):
    out = tmp_path / "training.json"
    args = training.parse_args(["--models", "DiT-Ti/4", "--image-size", "64", "--batch-size", "2", "--timed-steps", "1",
                                "--checkpointing", "both", "--matmul-size", "256", "--device", "cpu",
                                "--json-out", str(out)])  # fmt: skip
    rows = training.main(args)
    assert [(r["kind"], r["ckpt"]) for r in rows] == [(k, c) for k in training.KINDS for c in (False, True)]
    assert all(r["steps_s"] > 0 and r["peak_share"] > 0 and r["peak_mem_gb"] >= 0 for r in rows)
    by = {(r["kind"], r["ckpt"]): r for r in rows}
    # the same model: checkpointing adds the blocks' forward, KD the teacher's, the frozen gates need least
    assert (
        by[("train", True)]["gflop_step"]
        > by[("train", False)]["gflop_step"]
        > by[("prune-frozen", False)]["gflop_step"]
    )
    assert json.loads(out.read_text())["rows"] == rows


def test_training_benchmark_skips_rows_that_cannot_fit(tmp_path):
    args = training.parse_args(["--models", "DiT-XL/2", "--kinds", "train", "--memory-margin", "1e-6",
                                "--matmul-size", "256", "--device", "cpu",
                                "--json-out", str(tmp_path / "t.json")])  # fmt: skip
    [row] = training.main(args)
    assert "GiB free" in row["skipped"] and "steps_s" not in row


def test_evaluator_benchmark_runs(tmp_path):
    out = tmp_path / "evaluator.json"
    rows = evaluator.main(evaluator.parse_args(["--batch-sizes", "1", "--repeats", "1", "--image-size", "32",
                                                "--backends", "torch", "tf", "--matmul-size", "256", "--device", "cpu",
                                                "--json-out", str(out)]))  # fmt: skip
    assert rows[0]["backend"] == "torch" and rows[0]["img_s"] > 0 and 0 < rows[0]["peak_share"]
    assert rows[1]["backend"] == "tf" and rows[1]["note"].startswith("skipped")
    assert json.loads(out.read_text())["gflop_per_image"] == pytest.approx(evaluator.inception_flops(32) / 1e9)


@pytest.mark.slow  # a whole pipeline end to end
def test_interleaved_ab_runs(tmp_path):
    args = ab.parse_args(["--model", "DiT-Ti/4", "--image-size", "32", "--batch-size", "2", "--digits-batch-size", "2",
                          "--rounds", "1", "--experiments", "adamw", "ema", "precision", "attention", "sampling",
                          "pruning", "--matmul-size", "256", "--device", "cpu",
                          "--json-out", str(tmp_path / "ab.json")])  # fmt: skip
    results = ab.run(args)["results"]
    assert set(results) == {
        "pruning",
        "adamw",
        "ema",
        "precision DiT-Ti/4 b2",
        "precision DiT-Digits/2 b2",
        "attention",
        "sampling",
    }
    assert all(r["speedup_b_over_a"] > 0 for r in results.values())


def test_ab_interleaves_variants():
    calls = []
    medians = ab.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "a", "b"] and set(medians) == {"a", "b"}
