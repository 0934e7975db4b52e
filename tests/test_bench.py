"""Benchmarks stay runnable, and their analytic FLOP counts agree with torch's own FLOP counter."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import sampling
from bench.common import dit_forward_flops
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
                                "--device", "cpu", "--json-out", str(out)])  # fmt: skip
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
