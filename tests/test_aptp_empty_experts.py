"""An expert that filtering routed no caption to: `aptp.finetune` and `aptp.generate --expert_id` say so in one line
and exit 0, writing nothing. Only filtered/ is needed to get there (no router, no model), so the pruning directory
here is just write_assignments' files over a tiny CC3M tree. Training such an expert on all captions, and an expert
with fewer captions than a batch: tests/test_aptp_finetune.py."""

import numpy as np
import pytest

from aptp import finetune, generate
from aptp.assignments import write_assignments
from aptp.data import load_captions
from aptp.make_tiny import write_cc3m
from diffcompress.cli import run
from tests.conftest import ROOT

EMPTY = 1  # of experts 0..3, the one no caption goes to


@pytest.fixture(scope="module")
def pruning_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty-expert")
    cc3m = write_cc3m(root / "cc3m", train_rows=8, val_rows=4, size=16)
    prune_dir = root / "pruning"
    for split in ("train", "validation"):
        rows = len(load_captions("cc3m", cc3m, split))
        ids = np.array([0, 2, 3])[np.arange(rows) % 3]  # never EMPTY
        write_assignments(prune_dir, split, ids, 4, dataset="cc3m", data_dir=str(cc3m))
    return prune_dir


def exit_code(main, argv):
    """``main(argv)`` as ``python -m`` runs it (diffcompress.cli.run): 0, or the code of its SystemExit."""
    try:
        run(lambda: main(argv))
    except SystemExit as e:
        return e.code
    return 0


def test_finetune_of_an_empty_expert_says_so_and_exits_0(pruning_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--config", str(ROOT / "configs/aptp/finetuning/tiny.yaml"), f"pruning_dir={pruning_dir}"]
    assert exit_code(finetune.main, [*args, f"output_dir={out}", "--expert_id", str(EMPTY)]) == 0
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert len(lines) == 1 and printed.err == "", printed
    assert lines[0].startswith(f"expert {EMPTY}: no training caption of CC3M train")
    assert "nothing to train (--all_prompts_if_empty trains it on all 7 training captions)" in lines[0]
    assert not out.exists()
    default = pruning_dir / "finetuning"
    assert exit_code(finetune.main, [*args, "--expert_id", str(EMPTY)]) == 0 and not default.exists()
    assert exit_code(finetune.main, [*args, "--expert_id", "9"]) == 2  # not an expert: still an error
    assert "error: expert 9: the router of" in capsys.readouterr().err


def test_generate_skips_an_empty_expert(pruning_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["--pruning_dir", str(pruning_dir), "--expert_id", str(EMPTY), "--output_dir", str(out), "--device", "cpu"]
    assert exit_code(generate.main, argv) == 0
    printed = capsys.readouterr()
    assert printed.out == (
        f"expert {EMPTY}: no validation caption was routed to it ({pruning_dir / 'filtered'}); nothing to draw\n"
    )
    assert printed.err == "" and not out.exists()
    assert exit_code(generate.main, [*argv, "--split", "train", "--save_references"]) == 0
    assert "no train caption was routed to it" in capsys.readouterr().out and not out.exists()
