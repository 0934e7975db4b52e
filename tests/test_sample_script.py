"""sample.py end to end: a real run on a small pixel-space DiT, reproducibility, and a clear error."""

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from models_with_layer_pruning import create_model

from .conftest import ROOT


def run_sample(*args, check=True):
    cmd = [sys.executable, str(ROOT / "sample.py"), "--model", "DiT-S/8", "--image-size", "16", "--vae", "none",
           "--num-classes", "10", "--num-sampling-steps", "4", "--device", "cpu", *args]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_sample_grid_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=16, in_channels=3, num_classes=10)
    with torch.no_grad():  # non-zero adaLN/final layer so the samples depend on the weights
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(std=0.02)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "train_steps": 1}, ckpt)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    out = run_sample("--ckpt", str(ckpt), "--class-labels", "0,1,2,3,4,5", "--cfg-scale", "4.0", "--out", str(a))
    assert f"wrote {a}" in out.stdout
    run_sample("--ckpt", str(ckpt), "--class-labels", "0,1,2,3,4,5", "--cfg-scale", "4.0", "--out", str(b))
    img = np.asarray(Image.open(a))
    assert img.shape == (2 * 16 + 3 * 2, 4 * 16 + 5 * 2, 3)  # 6 images on a 4-wide grid with 2-pixel padding
    assert np.array_equal(img, np.asarray(Image.open(b)))  # same seed, same image
    assert img.std() > 10  # not a blank grid
    c = tmp_path / "c.png"
    out = run_sample("--ckpt", str(ckpt), "--class-labels", "0,1,2,3,4,5", "--sampler", "dpm-solver", "--out", str(c))
    assert "4 dpm-solver steps" in out.stdout
    dpm = np.asarray(Image.open(c))
    assert dpm.shape == img.shape and dpm.std() > 10 and not np.array_equal(dpm, img)


def test_sample_rejects_mismatched_checkpoint(tmp_path):
    small = create_model("DiT-S/8", input_size=16, in_channels=3, num_classes=10, depth=6)
    torch.save(small.state_dict(), tmp_path / "d6.pt")
    result = run_sample("--ckpt", str(tmp_path / "d6.pt"), "--out", str(tmp_path / "x.png"), check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "missing 60 keys (blocks.6-11.*)" in result.stderr
    assert "depth 6" in result.stderr
    assert not (tmp_path / "x.png").exists()
    run_sample("--ckpt", str(tmp_path / "d6.pt"), "--depth", "6", "--out", str(tmp_path / "x.png"))
    assert (tmp_path / "x.png").is_file()  # a shallow model of a non-XL source loads with --depth
