"""The digits demo: scikit-learn's 1,797 handwritten digits (8x8, 10 classes) as a small real dataset for the
whole TinyFusion pipeline on a CPU.

- Data: ``load_digits`` (values 0..16) scaled to [-1, 1], the grey channel replicated 3 times (a pixel-space
  model, ``--vae none``), split into a stratified training and held-out part, each written in the packed
  features layout (``features.npy`` [N, 1, 3, 8, 8] + ``labels.npy``): one view, as digits are not
  flip-invariant. Every training script reads it like extracted ImageNet latents.
- Evaluation: a small CNN classifier trained on the training split (seconds); for generated samples the
  class-conditional accuracy (the share classified as their label) and the FID in the classifier's penultimate
  feature space against the held-out split. The ceiling is real data: the classifier's held-out accuracy and
  the FID of training images (as many as there are samples) against the held-out split.
- Calibration loss: the diffusion training loss (MSE + VB) on the held-out split, with timesteps and noise
  drawn from a fixed seed, so every model is scored on exactly the same draws.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import write_json_atomic
from .data import FeatureDataset
from .errors import UserError
from .fid_metrics import activation_statistics, frechet_distance
from .sampling import to_uint8

MODEL = "DiT-Digits/2"
NUM_CLASSES = 10
IMAGE_SIZE = 8
CHANNELS = 3
SPLITS = ("train", "heldout")


# ------------------------------------------------------------------------------------------- data


def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 [N, 8, 8] in [-1, 1] (0..16 -> x / 8 - 1) and int64 labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 8.0 - 1.0).astype(np.float32), digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices, ascending: round(fraction * count) of every class, chosen by ``seed``."""
    if not 0 < heldout_fraction < 1:
        raise UserError(f"--heldout-fraction must lie strictly between 0 and 1, got {heldout_fraction}")
    rng = np.random.default_rng(seed)
    heldout = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(heldout_fraction * len(members)))
        if not 0 < k < len(members):
            raise UserError(f"--heldout-fraction {heldout_fraction} leaves class {c} with an empty part")
        heldout.append(rng.permutation(members)[:k])
    heldout = np.sort(np.concatenate(heldout))
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def write_split(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                **manifest) -> Path:  # fmt: skip
    """Write grey [N, 8, 8] images in [-1, 1] as the packed features layout, channels replicated, one view."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    features = np.repeat(images[:, None, None], CHANNELS, axis=2).astype(np.float32)  # [N, 1, 3, 8, 8]
    _save_npy_atomic(path / "features.npy", features)
    _save_npy_atomic(path / "labels.npy", labels.astype(np.int64))
    _save_npy_atomic(path / "indices.npy", indices.astype(np.int64))
    write_json_atomic(path / "manifest.json", {
        "source": "sklearn.datasets.load_digits", "layout": "packed", "count": len(labels), "views": 1,
        "latent_shape": [CHANNELS, IMAGE_SIZE, IMAGE_SIZE], "packed_dtype": "float32", "num_classes": NUM_CLASSES,
        "vae": "none", "image_size": IMAGE_SIZE, "value_range": [-1, 1], "packed_indices": "indices.npy",
        "class_counts": np.bincount(labels, minlength=NUM_CLASSES).tolist(), **manifest,
    })  # fmt: skip
    return path


def prepare(out: str | os.PathLike, heldout_fraction: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """Write ``out/train`` and ``out/heldout``; returns their paths."""
    images, labels = load_raw()
    parts = dict(zip(SPLITS, stratified_split(labels, heldout_fraction, seed)))
    paths = {}
    for name, idx in parts.items():
        paths[name] = write_split(Path(out) / name, images[idx], labels[idx], idx, split=name,
                                  heldout_fraction=heldout_fraction, split_seed=seed)  # fmt: skip
    return paths


def is_prepared(root: str | os.PathLike) -> bool:
    return all((Path(root) / s / "features.npy").is_file() and (Path(root) / s / "labels.npy").is_file()
               for s in SPLITS)  # fmt: skip


def read_split(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 3, 8, 8] in [-1, 1], labels int64 [N]) of a prepared split (view 0)."""
    dataset = FeatureDataset(path, layout="packed")
    if dataset.latent_shape != (CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"{path} holds {list(dataset.latent_shape)} features, not the digits' [3, 8, 8]")
    x = torch.from_numpy(np.array(dataset.features[:, 0], dtype=np.float32))
    return x, torch.from_numpy(dataset.labels.copy())


# ------------------------------------------------------------------------------------------ classifier


def to_classifier_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] (what samplers save) -> grey float [N, 1, 8, 8] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)).float()
    if x.dim() != 4 or x.shape[-1] != CHANNELS or x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        raise UserError(f"expected uint8 images [N, 8, 8, 3], got shape {list(x.shape)}")
    return ((x.mean(dim=-1) - 127.5) / 127.5)[:, None]


def real_as_uint8(images: torch.Tensor) -> np.ndarray:
    """Real images in [-1, 1] through the samplers' uint8 rounding, so real and generated are scored alike."""
    return to_uint8(images)


class DigitClassifier(nn.Module):
    """Two 3x3 convolutions, a 2x2 pool, a 64-d feature layer (the FID space) and a linear head."""

    FEATURES = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.FEATURES), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(self.FEATURES, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (background -1 fills the border): a little robustness."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
    return padded[..., dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]


def train_classifier(images_u8: np.ndarray, labels: np.ndarray | torch.Tensor, seed: int = 0, epochs: int = 30,
                     batch_size: int = 64) -> DigitClassifier:  # fmt: skip
    """Fit a DigitClassifier on uint8 [N, 8, 8, 3] images (seconds on a CPU); deterministic for a seed."""
    x, y = to_classifier_input(images_u8), torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images_u8: np.ndarray, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels [N], features [N, 64]) of uint8 [N, 8, 8, 3] images."""
    x = to_classifier_input(images_u8)
    preds, feats = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i : i + batch_size])
        feats.append(f)
        preds.append(model.head(f).argmax(dim=1))
    return torch.cat(preds).numpy(), torch.cat(feats).double().numpy()


@dataclass
class Evaluator:
    """The classifier and the held-out reference statistics; scores sets of uint8 images."""

    classifier: DigitClassifier
    ref_mu: np.ndarray
    ref_sigma: np.ndarray
    heldout_accuracy: float
    train_images: np.ndarray  # uint8, for the real-data ceiling
    train_labels: np.ndarray
    heldout_count: int
    seconds: float

    @classmethod
    def build(cls, data_root: str | os.PathLike, seed: int = 0, epochs: int = 30) -> Evaluator:
        """Train the classifier on ``data_root/train`` and summarise ``data_root/heldout``."""
        start = time.perf_counter()
        train_x, train_y = read_split(Path(data_root) / "train")
        held_x, held_y = read_split(Path(data_root) / "heldout")
        train_u8, held_u8 = real_as_uint8(train_x), real_as_uint8(held_x)
        classifier = train_classifier(train_u8, train_y, seed=seed, epochs=epochs)
        pred, feats = classify(classifier, held_u8)
        mu, sigma = activation_statistics(feats)
        accuracy = float((pred == held_y.numpy()).mean())
        return cls(classifier, mu, sigma, accuracy, train_u8, train_y.numpy(), len(held_y),
                   time.perf_counter() - start)  # fmt: skip

    def score(self, images_u8: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Class-conditional accuracy and FID (classifier features) against the held-out split."""
        pred, feats = classify(self.classifier, images_u8)
        mu, sigma = activation_statistics(feats)
        return {"accuracy": float((pred == np.asarray(labels)).mean()),
                "fid": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma), "n": len(labels)}  # fmt: skip

    def ceiling(self, n: int, seed: int = 0) -> dict[str, float]:
        """Real data as the best achievable: FID of ``n`` training images (a seeded, class-balanced draw when
        ``n`` is smaller than the split) against the held-out split, and the classifier's held-out accuracy."""
        idx = np.arange(len(self.train_labels))
        if n < len(idx):
            rng = np.random.default_rng(seed)
            per_class = [rng.permutation(np.flatnonzero(self.train_labels == c)) for c in range(NUM_CLASSES)]
            idx = np.sort(np.concatenate([p[: n // NUM_CLASSES + (c < n % NUM_CLASSES)]
                                          for c, p in enumerate(per_class)]))  # fmt: skip
        fid = self.score(self.train_images[idx], self.train_labels[idx])["fid"]
        return {"accuracy": self.heldout_accuracy, "fid": fid, "n": len(idx)}


# ------------------------------------------------------------------------------------- model metrics


@torch.no_grad()
def calibration_loss(model: torch.nn.Module, heldout: str | os.PathLike, draws: int = 4, seed: int = 0,
                     batch_size: int = 1024) -> float:  # fmt: skip
    """The diffusion loss (MSE + VB, what training minimises) of ``model`` in eval mode on the held-out split,
    averaged over ``draws`` (timestep, noise) pairs per image, all drawn from ``seed``: every model sees the
    same draws, so the numbers compare exactly."""
    from diffusion import create_diffusion

    x, y = read_split(heldout)
    diffusion = create_diffusion("")
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for _ in range(draws):
            t = torch.randint(0, diffusion.num_timesteps, (len(x),), generator=g)
            noise = torch.randn(x.shape, generator=g)
            for i in range(0, len(x), batch_size):
                sl = slice(i, i + batch_size)
                losses = diffusion.training_losses(model, x[sl].to(device), t[sl].to(device),
                                                   dict(y=y[sl].to(device)), noise=noise[sl].to(device))  # fmt: skip
                total += losses["loss"].double().sum().item()
                count += len(x[sl])
    finally:
        model.train(was_training)
    return total / count


@torch.no_grad()
def sampling_seconds(models: Sequence[torch.nn.Module], sampler_args, batch_size: int = 50, repeats: int = 2,
                     seed: int = 0) -> list[float]:  # fmt: skip
    """Best-of-``repeats`` wall time of one sampling run (``sampler_args``: sample.py-style flags) of a batch, for
    each model. The models take turns (A B A B ...), so a change in the machine's load hits them alike and their
    ratio stays meaningful on a shared machine."""
    from .sampling import sample_latents

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch_size, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    y = torch.arange(batch_size) % NUM_CLASSES
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, model in enumerate(models):
            model.eval()
            device = next(model.parameters()).device
            start = time.perf_counter()
            sample_latents(model, z.to(device), y.to(device), sampler_args, "fp32",
                           torch.Generator(device).manual_seed(seed), progress=False)  # fmt: skip
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@torch.no_grad()
def sample_digits(model: torch.nn.Module, sampler_args, n: int, seed: int = 0,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``n`` uint8 digits [n, 8, 8, 3] with labels i mod 10 from ``model``, one seeded batch, in memory."""
    from .sampling import sample_latents

    model.eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    y = torch.arange(n) % NUM_CLASSES
    x = sample_latents(model, z, y, sampler_args, "fp32", g, progress=progress)
    return to_uint8(x), y.numpy()


def save_grid(images_u8: np.ndarray, labels: np.ndarray, path: str | os.PathLike, rows: int = 8,
              scale: int = 4) -> Path:  # fmt: skip
    """A PNG with one column per class (0..9) and ``rows`` samples of it, each pixel ``scale`` x ``scale``."""
    from PIL import Image

    labels = np.asarray(labels)
    h = w = IMAGE_SIZE
    gap = 1
    canvas = np.full((rows * (h + gap) + gap, NUM_CLASSES * (w + gap) + gap, 3), 255, np.uint8)
    for c in range(NUM_CLASSES):
        for r, i in enumerate(np.flatnonzero(labels == c)[:rows]):
            y0, x0 = gap + r * (h + gap), gap + c * (w + gap)
            canvas[y0 : y0 + h, x0 : x0 + w] = images_u8[i]
    image = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
