"""sample.py end to end: a real run on a small pixel-space DiT, reproducibility, the grid as torchvision draws it,
and a clear error."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from diffcompress.cli import run
from diffcompress.sampling import save_grid
from models_with_layer_pruning import create_model

from .conftest import ROOT

FLAGS = ["--model", "DiT-S/8", "--image-size", "16", "--vae", "none", "--num-classes", "10",
         "--num-sampling-steps", "4", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=16, in_channels=3, num_classes=10)
    with torch.no_grad():  # non-zero adaLN/final layer so the samples depend on the weights
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(std=0.02)
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "train_steps": 1}, path)
    return path


def sample_in_process(*args) -> None:
    sample.main(sample.parse_args([*FLAGS, *args]))


@pytest.mark.slow
def test_sample_grid_from_checkpoint(tmp_path, ckpt):
    """The real command once; the same sampling in this process gives the same picture."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    labels = ["--class-labels", "0,1,2,3,4,5", "--cfg-scale", "4.0"]
    out = subprocess.run([sys.executable, str(ROOT / "sample.py"), *FLAGS, "--ckpt", str(ckpt), *labels, "--out",
                          str(a)], capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"wrote {a}" in out.stdout
    sample_in_process("--ckpt", str(ckpt), *labels, "--out", str(b))
    img = np.asarray(Image.open(a))
    assert img.shape == (2 * 16 + 3 * 2, 4 * 16 + 5 * 2, 3)  # 6 images on a 4-wide grid with 2-pixel padding
    assert np.array_equal(img, np.asarray(Image.open(b)))  # same seed, same image
    assert img.std() > 10  # not a blank grid


def test_dpm_solver_samples_differ_from_ddpm(tmp_path, ckpt, capsys):
    a, c = tmp_path / "a.png", tmp_path / "c.png"
    sample_in_process("--ckpt", str(ckpt), "--class-labels", "0,1,2,3,4,5", "--cfg-scale", "4.0", "--out", str(a))
    sample_in_process("--ckpt", str(ckpt), "--class-labels", "0,1,2,3,4,5", "--sampler", "dpm-solver", "--out", str(c))
    assert "4 dpm-solver steps" in capsys.readouterr().out
    img, dpm = np.asarray(Image.open(a)), np.asarray(Image.open(c))
    assert dpm.shape == img.shape and dpm.std() > 10 and not np.array_equal(dpm, img)


@pytest.mark.parametrize("n, nrow", [(6, 4), (1, 4), (8, 4), (3, 3), (5, 2)])
def test_grid_is_torchvisions_picture(tmp_path, n, nrow):
    from torchvision.utils import save_image

    images = torch.randn(n, 3, 16, 12, generator=torch.Generator().manual_seed(n)) * 0.7
    save_image(images, tmp_path / "tv.png", nrow=nrow, normalize=True, value_range=(-1, 1))
    save_grid(images, tmp_path / "ours.png", nrow=nrow)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ours.png")),
                                  np.asarray(Image.open(tmp_path / "tv.png")))  # fmt: skip


def test_sample_rejects_mismatched_checkpoint(tmp_path, capsys):
    small = create_model("DiT-S/8", input_size=16, in_channels=3, num_classes=10, depth=6)
    torch.save(small.state_dict(), tmp_path / "d6.pt")
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: sample_in_process("--ckpt", str(tmp_path / "d6.pt"), "--out", str(tmp_path / "x.png")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "missing 60 keys (blocks.6-11.*)" in err
    assert "depth 6" in err
    assert not (tmp_path / "x.png").exists()
    sample_in_process("--ckpt", str(tmp_path / "d6.pt"), "--depth", "6", "--out", str(tmp_path / "x.png"))
    assert (tmp_path / "x.png").is_file()


def test_sampling_precision_is_fp32_with_tf32_on_cuda_by_default():
    """As DiT's sampling scripts: fp32 on every device unless --precision asks otherwise; TF32 only exists on CUDA."""
    import sample_ddp
    from diffcompress.sampling import apply_precision, sampling_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert sampling_precision("auto", True, cpu) == ("fp32", False)
    assert sampling_precision("auto", True, cuda) == ("fp32", True)
    assert sampling_precision("auto", False, cuda) == ("fp32", False)
    assert sampling_precision("bf16", True, cuda) == ("bf16", True)
    assert sampling_precision("bf16", True, cpu) == ("bf16", False)
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        sampling_precision("fp16", True, cpu)
    for module in (sample, sample_ddp):
        args = module.parse_args([])
        assert (args.precision, args.tf32) == ("auto", True)
        assert module.parse_args(["--no-tf32", "--precision", "bf16"]).tf32 is False
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # the switches follow the flag on CUDA (setup_distributed turns them on); CPU leaves them alone
        assert apply_precision(sample.parse_args(["--no-tf32"]), cuda) == ("fp32", False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert apply_precision(sample.parse_args([]), cuda) == ("fp32", True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        assert apply_precision(sample.parse_args([]), cpu) == ("fp32", False)
        assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_default_checkpoint_is_dits_released_one():
    """No --ckpt: DiT-XL/2 takes DiT-XL-2-<size>.pt as DiT's scripts do; other models want --ckpt or --random-init."""
    from diffcompress.errors import UserError
    from diffcompress.sampling import default_checkpoint

    assert default_checkpoint(sample.parse_args([])) == "DiT-XL-2-256x256.pt"
    assert default_checkpoint(sample.parse_args(["--image-size", "512"])) == "DiT-XL-2-512x512.pt"
    assert default_checkpoint(sample.parse_args(["--ckpt", "x.pt"])) == "x.pt"
    assert default_checkpoint(sample.parse_args(["--random-init"])) is None
    with pytest.raises(UserError, match="--ckpt is required for --model DiT-D14/2"):
        default_checkpoint(sample.parse_args(["--model", "DiT-D14/2"]))
    with pytest.raises(UserError, match="--ckpt is required"):
        default_checkpoint(sample.parse_args(["--image-size", "128"]))
    with pytest.raises(UserError, match="exclude each other"):
        default_checkpoint(sample.parse_args(["--random-init", "--ckpt", "x.pt"]))
