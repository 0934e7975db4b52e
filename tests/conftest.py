"""Shared fixtures: the reference numbers from the official DiT code, and a tiny DiT built from them."""

from pathlib import Path

import pytest
import torch

from diffcompress.distributed import DistInfo
from models_with_layer_pruning import DiT

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent

# The toy setting of the pruning and distillation tests: a 4-class DiT on 8x8 latents, one CPU process.
TOY_DIT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, num_heads=4, num_classes=4)
CPU = DistInfo(0, 0, 1, torch.device("cpu"))
TOY_FLAGS = ["--num-classes", "4", "--global-batch-size", "16", "--num-workers", "0", "--ckpt-every", "100000"]


@pytest.fixture(scope="session")
def reference():
    return torch.load(DATA / "dit_reference.pt", weights_only=True)


@pytest.fixture()
def reference_model(reference):
    model = DiT(**reference["config"])
    model.load_state_dict(reference["state_dict"])
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a shared machine threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
