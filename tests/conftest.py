"""Shared fixtures: the reference numbers from the official DiT code, and a tiny DiT built from them."""

import contextlib
import os
import platform
import runpy
import subprocess
import sys
from dataclasses import dataclass
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

# Under pytest-xdist the workers share the cores: each takes its share of threads, and so do the processes it starts.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)
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


@dataclass
class ScriptResult:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        """The last non-empty line of stderr: a user error's one line."""
        return ([line for line in self.err.splitlines() if line.strip()] or [""])[-1]


@pytest.fixture()
def script(capsys, monkeypatch):
    """``script("train.py", *flags)`` runs a top-level script's ``__main__`` block in this process, as ``python
    train.py flags`` would, and returns its exit code, stdout and stderr. A traceback is raised, not returned: a
    user's mistake must end in one line (exit 2)."""

    def call(path: str, *args: str) -> ScriptResult:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", [str(ROOT / path), *map(str, args)])
        try:
            runpy.run_path(str(ROOT / path), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return ScriptResult(code, captured.out, captured.err)

    return call


# ---------------------------------------------------------------------------------------------------------------
# `make test-fast` runs the tests not marked slow (pyproject.toml): those that start no process and run no whole
# pipeline end to end. A test that starts one (a script, torchrun, accelerate, Slurm, bash) without the mark fails,
# so the split stays honest.


# The longest files (measured with --durations, 2 workers) start first, so no worker is left with a long one at the
# end while the other idles; the rest keep their order.
LONGEST_FIRST = ["test_multinode.py", "test_slurm.py", "test_demo_aptp.py", "test_cluster_scripts.py",
                 "test_readme_commands.py", "test_bad_input.py", "test_train.py", "test_aptp_prune.py",
                 "test_aptp_finetune.py", "test_extract_features.py", "test_digits.py"]  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


platform.processor()  # runs `uname -p` once per process (cached): here, not inside a test that must start none


@contextlib.contextmanager
def _processes_need_the_slow_mark(item):
    if item.get_closest_marker("slow"):
        yield
        return

    def refuse(self, args, *rest, **kwargs):
        raise AssertionError(f"{item.nodeid} starts a process ({args!r}): mark it @pytest.mark.slow")

    original, subprocess.Popen.__init__ = subprocess.Popen.__init__, refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _processes_need_the_slow_mark(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _processes_need_the_slow_mark(item):
        return (yield)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel with 2-layer towers and its processor, saved as a model folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from aptp.make_tiny import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path
