"""extract_features.py end to end: a real 2-process torchrun over a tiny image tree, with a tiny VAE and with pixels."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import extract_features
from diffcompress.data import FeatureDataset, center_crop_arr, pack_features

from .conftest import ROOT

CLASSES = ["ant", "bee", "cow"]
SIZES = [(16, 16), (20, 12), (12, 20), (33, 40), (16, 16)]  # (width, height): odd sizes exercise the crop


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """3 classes x 5 PNGs (one colour per class plus noise), a grayscale JPEG, and a corrupt file mid-list."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for k, (w, h) in enumerate(SIZES):
            base = np.array([80 * c + 20, 200 - 60 * c, 40 + 50 * k])
            arr = np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"img{k}.png")
    (root / "bee" / "bad.png").write_bytes(os.urandom(200))  # sorts first in its class: index 5
    Image.fromarray(rng.integers(0, 256, (24, 18), dtype=np.uint8), mode="L").save(root / "cow" / "gray.JPEG")
    return root


def expected_samples(root):
    """The extraction order, recomputed independently: sorted class folders, then sorted file names."""
    return [(p, c) for c, name in enumerate(sorted(os.listdir(root))) for p in sorted((root / name).iterdir())]


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(  # four blocks: downsamples by 8, like the SD VAE (and like VAECodec.downsample)
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=8, sample_size=16,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extract(*args, nproc=2):
    """Run extract_features.py under a real gloo torchrun (nproc > 1) or as a plain script."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
        launcher += [f"--master_port={free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [*launcher, "extract_features.py", "--device", "cpu", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)


def extract_in_process(*args):
    return extract_features.main(extract_features.parse_args([*map(str, args), "--device", "cpu"]))


def listing(*dirs):
    return {(d.name, p.name): (p.stat().st_mtime_ns, p.stat().st_size) for d in dirs for p in sorted(d.iterdir())}


def stems(d):
    return sorted(int(p.stem) for p in d.iterdir())


def check_files_and_labels(out, size, samples):
    """Every readable image's index exactly once, nothing else (no temp files), and the right label."""
    feat_dir, label_dir = out / f"imagenet{size}_features", out / f"imagenet{size}_labels"
    readable = [i for i, (p, _) in enumerate(samples) if p.name != "bad.png"]
    assert sorted(p.name for p in feat_dir.iterdir()) == sorted(f"{i}.npy" for i in readable)
    assert sorted(p.name for p in label_dir.iterdir()) == sorted(f"{i}.npy" for i in readable)
    for i in readable:
        y = np.load(label_dir / f"{i}.npy")
        assert y.dtype == np.int64 and y.tolist() == [samples[i][1]], i
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == len(readable) == len(samples) - 1
    assert manifest["num_images"] == len(samples) and manifest["classes"] == CLASSES
    assert manifest["num_classes"] == 3 and manifest["views"] == 2 and manifest["complete"]
    assert manifest["skipped"] == 1 and manifest["skipped_paths"] == [str(samples[5][0])]
    return feat_dir, label_dir, readable, manifest


def image_seed(global_seed, index):  # the documented contract, written out independently
    return int(np.random.SeedSequence([global_seed, index]).generate_state(1, dtype=np.uint64)[0])


@pytest.mark.slow
def test_vae_extraction_torchrun_resume_and_pack(images, vae_dir, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "features"
    args = ["--data-path", images, "--features-path", out, "--image-size", 16, "--vae", vae_dir]
    result = extract(*args, "--num-workers", 1, "--batch-size", 2, "--packed")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"16 of 17 images encoded (16 new) into {out / 'imagenet16_features'}" in result.stdout
    assert "skipped 1 unreadable images" in result.stdout and "bad.png" in result.stdout

    samples = expected_samples(images)
    assert samples[5][0].name == "bad.png"
    feat_dir, label_dir, readable, manifest = check_files_and_labels(out, 16, samples)
    assert manifest["latent_shape"] == [4, 2, 2] and manifest["world_size"] == 2
    assert manifest["vae"] == str(vae_dir) and manifest["global_seed"] == 0

    # Each file holds the posterior sample of [x, flip(x)] with noise seeded by (seed, index), recomputed here
    # one image at a time: so the ranks wrote the right images under the right names, whatever the batching.
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    for i in readable:
        with Image.open(samples[i][0]) as img:
            x = torch.from_numpy(center_crop_arr(img, 16)).permute(2, 0, 1).float() / 127.5 - 1
        with torch.no_grad():
            posterior = vae.encode(torch.stack([x, x.flip(-1)])).latent_dist
        noise = torch.randn((2, 4, 2, 2), generator=torch.Generator().manual_seed(image_seed(0, i)))
        want = (posterior.mean + posterior.std * noise) * 0.18215
        got = np.load(feat_dir / f"{i}.npy")
        assert got.shape == (2, 4, 2, 2) and got.dtype == np.float32
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-4)
        assert np.abs(got - posterior.mean.numpy() * 0.18215).max() > 1e-3  # a sample, not the mode

    # the packed copy (float16 by default) reads back as the per-file set; a float32 packing exactly
    files, packed = FeatureDataset(out, layout="files"), FeatureDataset(out)
    assert packed.layout == "packed" and len(packed) == len(files) == 16 and packed.num_classes == 3
    p32 = FeatureDataset(pack_features(out, tmp_path / "p32", dtype="float32"))
    for k in range(len(files)):
        (a, ya), (b, yb), (c, yc) = files[k], packed[k], p32[k]
        assert ya == yb == yc == samples[readable[k]][1]
        assert torch.equal(b, a.half().float()) and torch.equal(c, a)

    # Resume with another world size (1 process, in-process): only the two broken samples are redone, with
    # the same values (up to batch-size-dependent float rounding); features without a label are not done.
    before = listing(feat_dir, label_dir)
    saved = {i: np.load(feat_dir / f"{i}.npy") for i in (3, 12)}
    (feat_dir / "3.npy").unlink()
    (label_dir / "12.npy").unlink()
    extract_in_process(*args, "--num-workers", 0)
    after = listing(feat_dir, label_dir)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {("imagenet16_features", "3.npy"), ("imagenet16_labels", "3.npy")} | {
        ("imagenet16_features", "12.npy"),
        ("imagenet16_labels", "12.npy"),
    }
    for i in (3, 12):
        np.testing.assert_allclose(np.load(feat_dir / f"{i}.npy"), saved[i], rtol=0, atol=1e-6)
    assert json.loads((out / "manifest.json").read_text())["layout"] == "files+packed"  # re-packed: 2 new

    # a different seed must not resume into this folder
    with pytest.raises(ValueError, match="already holds features made with global_seed=0, not 1"):
        extract_in_process(*args, "--global-seed", 1)
    with pytest.raises(ValueError, match="must be a multiple of the VAE's factor 8"):
        extract_in_process(*args[:4], "--image-size", 12, "--vae", vae_dir)


@pytest.mark.slow
def test_pixels_exact_torchrun_and_noop_rerun(images, tmp_path, capsys):
    out = tmp_path / "pixels"
    args = ["--data-path", images, "--features-path", out, "--image-size", 8, "--vae", "none", "--num-workers", 0]
    result = extract(*args, "--batch-size", 3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples = expected_samples(images)
    feat_dir, label_dir, readable, manifest = check_files_and_labels(out, 8, samples)
    assert manifest["latent_shape"] == [3, 8, 8] and manifest["vae"] == "none" and manifest["layout"] == "files"
    for i in readable:
        with Image.open(samples[i][0]) as img:
            crop = center_crop_arr(img, 8)
        got = np.load(feat_dir / f"{i}.npy")
        assert got.shape == (2, 3, 8, 8) and got.dtype == np.float32
        # exactly the cropped pixels in [-1, 1]: they round-trip to the uint8 crop, and view 1 is the mirror
        assert np.array_equal(np.round((got[0].transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8), crop)
        assert np.array_equal(got[0], (crop.transpose(2, 0, 1).astype(np.float32) / 255 - 0.5) / 0.5)
        assert np.array_equal(got[1], got[0][:, :, ::-1])

    before = listing(feat_dir, label_dir)
    extract_in_process(*args)  # a re-run (here in one process) finds everything done
    assert "16 of 17 images encoded (0 new)" in capsys.readouterr().out
    assert listing(feat_dir, label_dir) == before  # nothing rewritten


def test_strict_stops_with_one_line(images, tmp_path, script):
    out = tmp_path / "strict"
    args = ["--data-path", images, "--features-path", out, "--image-size", 8, "--vae", "none", "--num-workers", 0]
    result = script("extract_features.py", *args, "--batch-size", 4, "--strict", "--device", "cpu")
    assert result.code == 2
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"error: cannot read image {images / 'bee' / 'bad.png'}: UnidentifiedImageError")
    assert not (out / "imagenet8_features" / "5.npy").exists()


def test_the_authors_training_flags_are_accepted(images, tmp_path, script):
    base = ["--data-path", images, "--features-path", tmp_path / "f", "--image-size", 8, "--vae", "none",
            "--num-workers", 0, "--device", "cpu"]  # fmt: skip
    result = script("extract_features.py", *base, "--num-classes", 2)
    assert result.code == 2 and "has 3 class folders, more than --num-classes 2" in result.last_line
    authors = ["--results-dir", "outputs", "--epochs", 1400, "--global-batch-size", 256, "--log-every", 100,
               "--ckpt-every", 50000, "--num-classes", 1000]  # fmt: skip
    result = script("extract_features.py", *base, *authors)
    assert result.code == 0, result.err
    assert "--results-dir, --epochs, --global-batch-size, --log-every, --ckpt-every have no effect" in result.out
    assert (tmp_path / "f" / "imagenet8_features" / "0.npy").is_file()
