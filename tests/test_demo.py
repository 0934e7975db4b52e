"""demo.py --quick: the whole digits pipeline (prepare, four pruning methods, fine-tuning and Masked KD, sampling,
evaluation) end to end through the real scripts, and a report with every row filled."""

import json
import re

import pytest

import demo
from diffcompress.stages import StageRunner

from .conftest import ROOT

TEACHER = ROOT / "assets" / "digits" / "teacher.safetensors"
METHODS = ["held-out digits (ceiling: real data)", "teacher (dense)", "learned 1:2 (LoRA) + fine-tune",
           "learned 1:2 (LoRA) + Masked KD", "BI score (ShortGPT) + fine-tune", "oracle (evenly spaced) + fine-tune",
           "random 1:2 + fine-tune"]  # fmt: skip
NUMBER = r"-?\d+(\.\d+)?"


def table_rows(report: str) -> dict[str, list[str]]:
    lines = report.split("| method | kept layers |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


@pytest.mark.slow  # a whole pipeline end to end
def test_quick_demo_writes_a_full_report(tmp_path, capsys):
    out, data = tmp_path / "demo", tmp_path / "data"
    report = demo.main(demo.parse_args(["--quick", "--out", str(out), "--data", str(data), "--teacher", str(TEACHER)]))
    captured = capsys.readouterr()
    printed = captured.out
    assert str(report) in printed and "decision plots" in printed
    # the console is the list of stages; each stage's output and progress lines are in its log
    assert captured.err == "" and "it/s" not in printed
    train_log = next((out / "logs").glob("*-train.log")).read_text()
    assert [line for line in train_log.splitlines() if line.startswith("train: ")] == [
        next(line for line in train_log.splitlines() if line.startswith("train: 4/4 (100%)"))
    ]
    rows = table_rows(report.read_text())
    assert list(rows) == METHODS
    for method, (kept, params, speedup, accuracy, fid, calib) in rows.items():
        assert re.fullmatch(NUMBER, accuracy) and re.fullmatch(NUMBER, fid), (method, rows[method])
        if method.startswith("held-out"):
            continue
        assert re.fullmatch(NUMBER + "x", speedup) and re.fullmatch(NUMBER, calib), (method, rows[method])
        assert params == ("3.65M" if method.startswith("teacher") else "1.87M")
        if method.startswith("teacher"):
            assert kept == "all 12"
        else:
            assert len(json.loads(kept)) == 6
    assert rows["oracle (evenly spaced) + fine-tune"][0] == "[0, 2, 4, 7, 9, 11]"

    results = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in results["runs"]}
    teacher_loss = runs["teacher (dense)"]["calibration_loss"]
    assert all(r["calibration_loss"] > teacher_loss for m, r in runs.items() if m != "teacher (dense)")
    assert {p.name for p in (out / "grids").iterdir()} == {"teacher.png", "learned-1-2-ft.png", "learned-1-2-kd.png",
                                                           "bi-ft.png", "oracle-ft.png", "random-ft.png"}  # fmt: skip
    assert (out / "decisions-1-2.png").stat().st_size > 0
    commands = (out / "commands.sh").read_text()
    for script in ("prepare_digits.py", "prune_by_learning.py", "prune_by_score.py", "prune_by_index.py", "train.py",
                   "train_masked_kd.py", "sample_ddp.py"):  # fmt: skip
        assert f"python {script} " in commands


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(demo.UserError, match="--seeds 'a,b'"):
        demo.main(demo.parse_args(["--quick", "--seeds", "a,b", "--out", str(tmp_path)]))
    with pytest.raises(demo.UserError, match="make teacher"):
        demo.main(demo.parse_args(["--quick", "--teacher", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)]))


def test_a_preempted_stage_stops_the_demo(tmp_path, monkeypatch):
    """A training stage returns normally after a SIGTERM checkpoint; the demo must stop, not go on to the next."""
    (tmp_path / "fake_stage.py").write_text(
        "import argparse\n"
        "def parse_args(argv):\n    return argparse.Namespace()\n"
        "def main(args):\n    return {'preempted': True}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(demo.UserError, match="stopped by a signal during: a stage"):
        StageRunner(tmp_path / "out", in_process=True)("fake_stage", [], "a stage")
