"""sample_ddp.py: 2-process torchrun, results independent of the world size, re-runs fill only gaps,
and the npz holds the PNGs in index order with their labels."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample_ddp
from diffcompress import cli
from models_with_layer_pruning import create_model

from .conftest import ROOT
from .test_train import free_port

ARGS = ["--model", "DiT-Ti/8", "--image-size", "16", "--vae", "none", "--num-classes", "10",
        "--num-sampling-steps", "3", "--sampler", "ddim", "--num-fid-samples", "10", "--per-proc-batch-size", "3",
        "--device", "cpu"]  # fmt: skip


def torchrun_two(ckpt, sample_dir) -> str:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}"]  # fmt: skip
    cmd = [*launch, str(ROOT / "sample_ddp.py"), *ARGS, "--ckpt", str(ckpt), "--sample-dir", str(sample_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run(capsys, ckpt, sample_dir, *extra, ok=True) -> str:
    """One process, in this one, through the entry point's error handling: its stdout, or its one-line error."""
    capsys.readouterr()
    args = sample_ddp.parse_args([*ARGS, "--ckpt", str(ckpt), "--sample-dir", str(sample_dir), *extra])
    if ok:
        sample_ddp.main(args)
        return capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda: sample_ddp.main(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.slow
def test_sample_ddp(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("DiT-Ti/8", input_size=16, in_channels=3, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(std=0.05)
    ckpt = tmp_path / "ti.pt"
    torch.save(model.state_dict(), ckpt)

    out = torchrun_two(ckpt, tmp_path / "two")
    (npz_path,) = (tmp_path / "two").glob("*.npz")
    assert f"wrote {npz_path}" in out
    data = np.load(npz_path)
    arr, labels = data["arr_0"], data["labels"]
    assert arr.shape == (10, 16, 16, 3) and arr.dtype == np.uint8 and labels.shape == (10,)
    folder = npz_path.parent / npz_path.name.removesuffix(".npz")
    assert "cfg-1.5" in folder.name
    pngs = sorted(folder.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    for i, p in enumerate(pngs):
        assert np.array_equal(arr[i], np.asarray(Image.open(p)))  # index order, not directory order
    assert arr.std() > 5 and len(set(labels.tolist())) > 2 and labels.max() < 10

    run(capsys, ckpt, tmp_path / "one")  # one process, other batches: the same images and labels
    single = np.load(next((tmp_path / "one").glob("*.npz")))
    assert np.array_equal(single["labels"], labels)
    assert np.abs(single["arr_0"].astype(int) - arr.astype(int)).max() <= 1

    stamps = {p.name: p.stat().st_mtime_ns for p in pngs}
    (folder / "000003.png").unlink()
    (folder / "000008.png").unlink()
    out = run(capsys, ckpt, tmp_path / "two")
    assert "8 of 10 samples exist" in out
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(stamps)
    changed = {p.name for p in folder.glob("*.png") if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {"000003.png", "000008.png"}
    assert np.abs(np.load(npz_path)["arr_0"].astype(int) - arr.astype(int)).max() <= 1

    run(capsys, ckpt, tmp_path / "balanced", "--balanced-labels")
    balanced = np.load(next((tmp_path / "balanced").glob("*.npz")))["labels"]
    assert balanced.tolist() == [i % 10 for i in range(10)]

    # images of other settings or of a new checkpoint under the same file name are never mixed with these
    (folder / "000005.png").unlink()
    err = run(capsys, ckpt, tmp_path / "two", "--cfg-all-channels", ok=False)  # not in the folder's name
    assert "holds samples made with another cfg_all_channels" in err
    with torch.no_grad():
        model.final_layer.linear.weight.add_(0.1)
    torch.save(model.state_dict(), ckpt)
    os.utime(ckpt, ns=(0, 12345))  # a different modification time even on a coarse-clock file system
    err = run(capsys, ckpt, tmp_path / "two", ok=False)
    assert "holds samples made with another ckpt" in err
    assert "000005.png" not in os.listdir(folder)


def test_npz_records_precision_and_tf32(tmp_path, capsys, one_thread):
    """fp32 by default (no TF32 on CPU), bf16 only when asked; both in the npz and the folder's run.json, and a
    re-run in another precision is refused rather than mixing images."""
    import json

    flags = [*ARGS, "--random-init", "--num-fid-samples", "2", "--num-sampling-steps", "2"]
    npz = sample_ddp.main(sample_ddp.parse_args([*flags, "--sample-dir", str(tmp_path / "a")]))
    with np.load(npz) as data:
        assert str(data["precision"]) == "fp32" and not bool(data["tf32"]) and data["arr_0"].shape == (2, 16, 16, 3)
    record = json.loads((npz.parent / npz.name.removesuffix(".npz") / "run.json").read_text())
    assert (record["precision"], record["tf32"], record["random_init"]) == ("fp32", False, True)
    npz = sample_ddp.main(sample_ddp.parse_args([*flags, "--precision", "bf16", "--sample-dir", str(tmp_path / "b")]))
    with np.load(npz) as data:
        assert str(data["precision"]) == "bf16"
    (next((tmp_path / "a").glob("*/000001.png"))).unlink()
    args = sample_ddp.parse_args([*flags, "--precision", "bf16", "--sample-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit):
        cli.run(lambda: sample_ddp.main(args))
    assert "holds samples made with another precision" in capsys.readouterr().err
