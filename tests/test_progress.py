"""Progress output: a bar only on a terminal; in a log a line every so often and one at the end."""

import io

import pytest
from tqdm.auto import tqdm

from diffcompress import progress
from diffcompress.progress import LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_mode_follows_the_terminal_ci_and_the_environment(monkeypatch):
    monkeypatch.delenv("DIFFCOMPRESS_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("sys.stderr", Terminal())
    assert progress.mode() == "bar" and isinstance(progress_bar(range(3)), tqdm)
    monkeypatch.setenv("CI", "true")
    assert progress.mode() == "lines"
    monkeypatch.delenv("CI")
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a log file
    assert progress.mode() == "lines" and isinstance(progress_bar(range(3)), LineProgress)
    for chosen in ("bar", "lines", "off"):
        monkeypatch.setenv("DIFFCOMPRESS_PROGRESS", chosen)
        assert progress.mode() == chosen
    monkeypatch.setenv("DIFFCOMPRESS_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="DIFFCOMPRESS_PROGRESS='fancy': expected bar, lines or off"):
        progress.mode()


def test_a_long_loop_writes_a_few_lines_not_one_per_step(monkeypatch):
    clock = iter(range(0, 10_000, 1))  # one second per step
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    bar = LineProgress(total=300, desc="train", every=100, file=out)
    for step in range(300):
        bar.update(1)
        if step == 149:
            bar.set_postfix(loss=0.123456, lr="1e-4")
    bar.close()
    bar.close()  # once only
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # at 100 s, 200 s, 300 s, and the closing line
    assert lines[0] == "train: 100/300 (33%) 1.01 s/it, 01:41, 03:22 left"
    assert lines[1].endswith(": loss=0.1235, lr=1e-4")
    assert lines[-1].startswith("train: 300/300 (100%)") and "left" not in lines[-1]


def test_iteration_resume_inner_loops_and_off(monkeypatch):
    out = io.StringIO()
    assert list(LineProgress(range(5), desc="npz", every=1e9, file=out)) == list(range(5))
    assert out.getvalue().startswith("npz: 5/5 (100%)")  # the total comes from len()

    out = io.StringIO()
    resumed = LineProgress(total=10, initial=6, desc="train", every=1e9, file=out)
    resumed.close()  # resumed at its end: nothing done here, nothing to say
    assert out.getvalue() == "" and resumed.n == 6

    out = io.StringIO()
    list(LineProgress(range(5), desc="sampling", leave=False, every=1e9, file=out))
    assert out.getvalue() == ""  # an inner loop says nothing at its end

    monkeypatch.setenv("DIFFCOMPRESS_PROGRESS", "lines")
    bar = progress_bar(range(3), disable=True)  # e.g. not rank 0
    assert list(bar) == [0, 1, 2] and bar.silent


def test_format_seconds():
    assert progress.format_seconds(5) == "00:05"
    assert progress.format_seconds(3725) == "1:02:05"
