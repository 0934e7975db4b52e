"""Shared fixtures: the reference numbers from the official DiT code, and a tiny DiT built from them."""

from pathlib import Path

import pytest
import torch

from models_with_layer_pruning import DiT

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def reference():
    return torch.load(DATA / "dit_reference.pt", weights_only=True)


@pytest.fixture()
def reference_model(reference):
    model = DiT(**reference["config"])
    model.load_state_dict(reference["state_dict"])
    return model.eval()
