"""Faults of the environment and of the data during training (issue 21): a full disk, an unwritable folder, a NaN
sample, killed writes. Each ends in one line naming the file, with the previous state intact."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import train as train_script
from diffcompress.checkpoint import remove_partial_writes, save_checkpoint
from diffcompress.cli import environment_error
from diffcompress.distributed import DistInfo
from diffcompress.trainer import TrainingError, train
from models_with_layer_pruning import create_model
from tests.bad_input import run_command
from tests.bad_input.training import TINY, features

pytestmark = pytest.mark.usefixtures("one_thread")


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_previous(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = features(tmp_path)
    run = ["train.py", *TINY, "--data-path", data, "--resume", "auto"]
    assert run_command([*run, "--max-steps", "1"], capsys, monkeypatch).code == 0
    ckpt = tmp_path / "outputs" / "train-DiT-Ti-4" / "checkpoints"
    before = (ckpt / "0000001.pt").read_bytes()

    def full(fd):  # the data does not fit: the device says so when the write is flushed
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    result = run_command([*run, "--max-steps", "2"], capsys, monkeypatch)
    assert result.code == 2 and "Traceback" not in result.err, result.err
    assert result.last_line.startswith("error: ") and "0000002.pt" in result.last_line, result.last_line
    assert "no space left" in result.last_line
    assert sorted(p.name for p in ckpt.iterdir()) == ["0000001.pt"]  # no half file, no temporary
    assert (ckpt / "0000001.pt").read_bytes() == before


def test_save_checkpoint_names_the_file_on_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError) as e:
        save_checkpoint({"w": torch.zeros(3)}, tmp_path / "a.pt")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code, words",
    [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
     (errno.ENOTDIR, "not a folder")],
)  # fmt: skip
def test_environment_errors_are_one_line_naming_the_path(code, words):
    line = environment_error(OSError(code, os.strerror(code), "/runs/x/ckpt.pt"))
    assert "/runs/x/ckpt.pt" in line and words in line and "\n" not in line
    assert environment_error(OSError(errno.EIO, "I/O error", "/x")) is None  # not said as the user's: a traceback


def test_programming_errors_keep_their_traceback(capsys):
    from diffcompress.cli import run

    with pytest.raises(TypeError):
        run(lambda: len(3))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_results_dir_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = run_command(["train.py", *TINY, "--data-path", features(tmp_path), "--max-steps", "1",
                          "--results-dir", locked], capsys, monkeypatch)  # fmt: skip
    assert result.code == 2 and "Traceback" not in result.err
    assert "locked" in result.last_line and "permission denied" in result.last_line


class NamedSamples(torch.utils.data.Dataset):
    """Toy latents that, unlike the feature datasets, do not check their values: the loop must name the NaN one."""

    def __init__(self, n=8, nan=3):
        self.x = torch.randn(n, 2, 4, 8, 8)
        self.x[nan] = float("nan")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 4

    def describe(self, i):
        return f"latents/{i:03d}.npy"


def test_a_step_skipped_for_a_nan_sample_names_it(tmp_path):
    args = train_script.parse_args([*TINY, "--data-path", "-", "--results-dir", str(tmp_path), "--max-steps", "3"])
    model = create_model("DiT-Ti/4", input_size=8, num_classes=4)
    with pytest.raises(TrainingError, match=r"all 3 steps .*non-finite input in latents/003\.npy") as e:
        train(args, DistInfo(0, 0, 1, torch.device("cpu")), model, _diffusion_objective(), NamedSamples())
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "train-DiT-Ti-4" / "checkpoints").glob("*.pt"))


def _diffusion_objective():
    from diffcompress.trainer import diffusion_objective
    from diffusion import create_diffusion

    return diffusion_objective(create_diffusion(""))


def test_remove_partial_writes_keeps_complete_files(tmp_path):
    for name in ("0000001.pt", "0000001.pt.json", ".0000002.pt.abc123.tmp", ".x.json.77.tmp"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".checkpoint-3.tmp").mkdir()  # APTP's folders are its own to clean
    removed = remove_partial_writes(tmp_path)
    assert sorted(p.name for p in removed) == [".0000002.pt.abc123.tmp", ".x.json.77.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-3.tmp", "0000001.pt", "0000001.pt.json"]
