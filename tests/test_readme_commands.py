"""The TinyFusion README's commands, pasted: each runs here as written (on tiny stand-ins) and leaves its outputs
where the authors' code puts them.

Stand-ins (the commands keep every flag; only what XL/2 and ImageNet would need on a CPU is swapped):
- the registry names the README uses are narrow models of the same depth and structure: ``DiT-XL/2`` is 28 blocks,
  ``DiT-D14/2`` 14 and ``DiT-XL-1-2`` 28 in 14 groups of 1:2, all of width 32 with patch 4: 64 tokens of a 32x32
  latent (256-pixel images, the authors' default) for pruning and sampling, 4 tokens of 8x8 latents for the
  training rows (their ``data/imagenet_encoded`` and checkpoints are of that size);
- ``stabilityai/sd-vae-ft-ema`` is a tiny AutoencoderKL (downsampling by 8) in a hub cache of its own, offline;
- ``pretrained/*.pt``, ``data/imagenet/train`` (9 small images), ``data/imagenet_encoded`` (256 latents, the
  authors' per-file layout) and the FID Inception weights are written by the fixtures;
- ``torchrun --nproc_per_node=8`` runs as one in-process run (the launcher is tested in test_distributed.py).
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models_with_layer_pruning as mwlp
from diffcompress.checkpoint import load_file
from models_with_layer_pruning import DiT

from .test_evaluator import random_images, weights  # noqa: F401 (a fixture: the random FID Inception)

README = Path(__file__).parent.parent / "README.md"
LEARNED = "outputs/pruned/DiT-D14-Learned.pt"
XL = "pretrained/DiT-XL-2-256x256.pt"
WIDTH, HEADS, PATCH, LATENT = 32, 2, 4, 32
SMALL = 8  # the training rows' latents: 8x8 (64-pixel images), 4 tokens; 100 steps at batch 256 stay seconds
FINETUNED = "outputs/D14-Learned-Finetuning-DiT-D14-2/checkpoints"


def standin(depth: int, groups=None):
    def build(**kwargs) -> DiT:
        return DiT(**{**build.arch, **kwargs})

    build.arch = dict(depth=depth, hidden_size=WIDTH, num_heads=HEADS, patch_size=PATCH, groups=groups)
    return build


STANDINS = {"DiT-XL/2": standin(28), "DiT-D14/2": standin(14), "DiT-XL-1-2": standin(28, [[1, 2]] * 14)}


def xl_model(latent: int) -> DiT:
    """The stand-in DiT-XL/2 with random non-zero weights (DiT's init zeroes adaLN: every block an identity)."""
    model = STANDINS["DiT-XL/2"](input_size=latent, num_classes=1000)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


# ------------------------------------------------------------------------------------------ the world


@pytest.fixture(scope="module")
def world(tmp_path_factory, weights):  # noqa: F811
    """Every input the README's commands read, written once; each row runs in a copy of it."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n01440764", "n01443537", "n01484850"]):
        (root / "data/imagenet/train" / name).mkdir(parents=True)
        for k in range(3):
            arr = np.clip(np.array([80 * c, 90, 30 * k]) + rng.integers(0, 60, (24, 20, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8)).save(root / "data/imagenet/train" / name / f"{name}_{k}.JPEG")
    feats, labels = root / "data/imagenet_encoded/imagenet64_features", root / "data/imagenet_encoded/imagenet64_labels"
    feats.mkdir(parents=True)
    labels.mkdir()
    for i in range(256):
        x = rng.standard_normal((4, SMALL, SMALL)).astype(np.float32)
        np.save(feats / f"{i}.npy", np.stack([x, x[..., ::-1]]))
        np.save(labels / f"{i}.npy", np.array([int(rng.integers(1000))]))
    for base, latent in ((root, LATENT), (root / "small", SMALL)):
        xl = xl_model(latent)
        (base / "pretrained").mkdir(parents=True)
        torch.save(xl.state_dict(), base / XL)
        d14 = xl.pruned(list(range(1, 28, 2))).state_dict()
        (base / "outputs/pruned").mkdir(parents=True)
        torch.save(d14, base / LEARNED)
    d14 = xl_model(LATENT).pruned(list(range(1, 28, 2))).state_dict()
    torch.save(d14, root / "pretrained/TinyDiT-D14-MaskedKD-500K.pt")
    (root / FINETUNED).mkdir(parents=True)
    torch.save({"model": d14, "ema": d14, "train_steps": 500_000}, root / FINETUNED / "0500000.pt")
    np.savez(root / "data/VIRTUAL_imagenet256_labeled.npz", arr_0=random_images(10, 1))
    (root / "samples").mkdir()
    np.savez(root / "samples" / SAMPLE_NPZ, arr_0=random_images(8, 2, smooth=True))

    hub = root / ".hub"  # the tiny VAE where the hub cache keeps stabilityai/sd-vae-ft-ema
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    )  # fmt: skip
    repo = hub / "models--stabilityai--sd-vae-ft-ema"
    vae.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text("0" * 40)
    (root / ".cache").mkdir()
    (root / ".cache/pt_inception-2015-12-05-6726825d.pth").symlink_to(weights)  # 95 MB: linked, not copied
    return root


@pytest.fixture()
def paste(world, tmp_path, monkeypatch, script, one_thread):
    """``paste(command)`` runs a README command line in a fresh copy of the world, as the cwd."""
    import huggingface_hub.constants

    cwd = tmp_path / "cwd"
    shutil.copytree(world, cwd, symlinks=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cwd / ".hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIFFCOMPRESS_CACHE", str(cwd / ".cache"))
    for name, build in STANDINS.items():
        monkeypatch.setitem(mwlp.DiT_models, name, build)

    def run(command: str):
        words = shlex.split(command)
        while words[0] in ("python", "torchrun") or words[0].startswith("--n"):
            words.pop(0)  # the launcher: one process here
        return script(words[0], *words[1:])

    return run


# ------------------------------------------------------------------------------------------ the table

SAMPLE_NPZ = "DiT-D14-2-0500000-size-256-vae-ema-cfg-1.5-seed-0.npz"  # DiT's sample_ddp.py naming


def small_world(cwd: Path) -> None:
    """The training rows read 8x8 latents: their checkpoints are of that size too."""
    shutil.copytree(cwd / "small", cwd, dirs_exist_ok=True)


def pruned_d14(path: str) -> None:
    state = load_file(path)
    assert sum(1 for k in state if k.endswith("attn.qkv.weight")) == 14


def no_features(cwd: Path) -> None:
    shutil.rmtree(cwd / "data/imagenet_encoded")  # the fixture's stand-in latents: this row writes its own


def features_written(cwd: Path) -> None:
    feats = sorted((cwd / "data/imagenet_encoded/imagenet256_features").glob("*.npy"))
    assert len(feats) == 9 and (cwd / "data/imagenet_encoded/imagenet256_labels/8.npy").is_file()
    assert np.load(feats[0]).shape == (2, 4, LATENT, LATENT)


def learned(cwd: Path) -> None:
    pruned_d14(LEARNED)
    assert (cwd / "outputs/D14-Learned-DiT-XL-1-2").is_dir()


def finetuned(cwd: Path) -> None:
    ckpt = cwd / "outputs/D14-Learned-Finetuning-DiT-D14-2/checkpoints/0000100.pt"  # 100 epochs of 1 step
    assert set(load_file(ckpt)) >= {"model", "ema", "opt", "sched", "train_steps", "args"}


def distilled(cwd: Path) -> None:
    assert (cwd / "outputs/D14-Learned-RepKD-DiT-D14-2/checkpoints/0000100.pt").is_file()


@dataclass
class Row:
    section: str
    command: str
    check: Callable[[Path], None]
    as_written: str = "yes"
    before: Callable[[Path], None] | None = None


pytestmark = pytest.mark.slow  # every row runs a whole script end to end

ROWS = [
    Row("1. features", "torchrun --nnodes=1 --nproc_per_node=1 extract_features.py --model DiT-XL/2 "
        "--data-path data/imagenet/train --features-path data/imagenet_encoded", features_written, before=no_features),
    Row("2. learnable pruning", "torchrun --nnodes=1 --nproc_per_node=8 prune_by_learning.py --model DiT-XL-1-2 "
        f"--load-weight {XL} --data-path data/imagenet_encoded --epochs 1 --prefix D14-Learned --delta-w --lora "
        f"--save-model {LEARNED}", learned, before=small_world),
    Row("2. BI score", f"python prune_by_score.py --model DiT-XL/2 --ckpt {XL} "
        "--save-model outputs/pruned/DiT-D14-Score.pt --n-pruned 14",
        lambda cwd: pruned_d14("outputs/pruned/DiT-D14-Score.pt")),
    Row("2. oracle", f"python prune_by_index.py --model DiT-XL/2 --ckpt {XL} "
        "--save-model outputs/pruned/DiT-D14-Oracle.pt --kept-indices "
        '"[0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27]"',
        lambda cwd: pruned_d14("outputs/pruned/DiT-D14-Oracle.pt")),
    Row("3. fine-tuning", f"torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiT-D14/2 --load-weight {LEARNED} "
        "--data-path data/imagenet_encoded --epochs 100 --prefix D14-Learned-Finetuning", finetuned,
        before=small_world),
    Row("3. Masked KD", f"torchrun --nnodes=1 --nproc_per_node=8 train_masked_kd.py --model DiT-D14/2 "
        f"--load-weight {LEARNED} --data-path data/imagenet_encoded --epochs 100 --prefix D14-Learned-RepKD "
        f"--teacher DiT-XL/2 --load-teacher {XL}", distilled, before=small_world),
    Row("4. sampling", "python sample.py --model DiT-D14/2 --ckpt pretrained/TinyDiT-D14-MaskedKD-500K.pt",
        lambda cwd: Image.open(cwd / "sample.png").verify()),
    Row("4. sampling for FID", "torchrun --nnodes=1 --nproc_per_node=8 sample_ddp.py --model DiT-D14/2 "
        "--ckpt outputs/D14-Learned-Finetuning/checkpoints/0500000.pt --num-fid-samples 8",
        lambda cwd: np.load(cwd / "samples" / SAMPLE_NPZ)["arr_0"].shape == (8, 256, 256, 3),
        as_written="+ --num-fid-samples 8 (of 50,000)", before=lambda cwd: shutil.rmtree(cwd / "samples")),
    Row("5. evaluation", f"python evaluator.py data/VIRTUAL_imagenet256_labeled.npz samples/{SAMPLE_NPZ}",
        lambda cwd: None),
]  # fmt: skip


@pytest.mark.parametrize("row", [pytest.param(row, id=row.section) for row in ROWS])
def test_readme_command_runs_as_written(row, paste):
    if row.before:
        row.before(Path.cwd())
    result = paste(row.command)
    assert result.code == 0, f"{row.command}\n{result.err[-2000:]}"
    assert row.check(Path.cwd()) is not False


def test_the_readme_lists_the_same_commands():
    """README's block of the authors' commands holds exactly these lines (the stand-in flags aside)."""
    text = README.read_text()
    block = text[text.index("<!-- tinyfusion-readme-commands -->") :]
    block = block[block.index("```bash") + 7 : block.index("```", block.index("```bash") + 7)]
    lines = [" ".join(line.split()) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    commands = [line for line in lines if not line.startswith("#")]
    expected = [" ".join(row.command.replace(" --num-fid-samples 8", "").split()) for row in ROWS]
    expected[-1] = expected[-1].replace(f"samples/{SAMPLE_NPZ}", "PATH_TO_YOUR_SAMPLES.npz")
    assert commands == expected
