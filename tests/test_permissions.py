"""Checkpoints and pruned models get the user's umask (0644 under umask 022), not mkstemp's private 0600."""

import os
import stat
from contextlib import contextmanager

import pytest
import torch

from diffcompress.checkpoint import current_umask, load_state_dict, new_file_mode, save_checkpoint, save_pruned
from models_with_layer_pruning import DiT, pruned_state_dict

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, num_heads=2, num_classes=4)


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_mode(folder, mask: int) -> int:
    """The mode a plain open() gives a new file under ``mask``: what every write of ours must match."""
    probe = folder / f"probe-{mask:03o}"
    with umask(mask):
        probe.write_bytes(b"x")
    return mode(probe)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640), (0o002, 0o664)])
def test_umask_is_read_without_changing_it(mask, expected):
    with umask(mask):
        assert current_umask() == mask
        assert new_file_mode() == expected
        assert os.umask(mask) == mask  # still in force after reading it


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_checkpoints_and_pruned_models_follow_the_umask(tmp_path, mask):
    expected = plain_mode(tmp_path, mask)
    assert expected == {0o022: 0o644, 0o077: 0o600}[mask]
    torch.manual_seed(0)
    model = DiT(depth=4, **TINY)
    shallow = pruned_state_dict(model.state_dict(), [0, 2])
    with umask(mask):
        ckpt = save_checkpoint({"model": model.state_dict(), "train_steps": 3}, tmp_path / "ckpt" / "0000003.pt")
        tensors = save_checkpoint(dict(model.state_dict()), tmp_path / "model.safetensors", metadata={"a": 1})
        pruned = save_pruned(shallow, tmp_path / "pruned" / "D2.pt", [0, 2], source_model="DiT-S/2")
        again = save_pruned(shallow, tmp_path / "pruned" / "D2.pt", [0, 2], source_model="DiT-S/2")  # overwrite
    for path in (ckpt, tensors, tensors.with_name(tensors.name + ".json"), pruned, pruned.with_name("D2.pt.json")):
        assert mode(path) == expected, f"{path.name}: {mode(path):03o} != {expected:03o}"
    assert again == pruned and mode(again) == expected
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file left behind
    loaded = load_state_dict(pruned)
    assert loaded.keys() == shallow.keys() and all(torch.equal(loaded[k], v) for k, v in shallow.items())
