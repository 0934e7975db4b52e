"""Bad input and faults (issue 21), table-driven: every row runs one command on a small broken input and checks the
exit code, that the error is one line naming the file or flag (never a traceback), and that nothing wrong was
written or the previous state is intact. The rows live in tests/bad_input/ by area."""

from __future__ import annotations

import pytest

from tests.bad_input import CLASSES, Case, checkpoints, data, evaluation, run_command, training

CASES: list[Case] = [*training.CASES, *data.CASES, *checkpoints.CASES, *evaluation.CASES]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_class_has_rows():
    assert {c.klass for c in CASES} == set(CLASSES)
    assert len({c.id for c in CASES}) == len(CASES), "row ids must be unique"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = case.prepare(tmp_path)
    result = run_command(argv, capsys, monkeypatch)
    assert "Traceback" not in result.err, result.err[-3000:]
    assert result.code == case.code, f"exit {result.code}, expected {case.code}\n{result.err[-2000:]}"
    if case.code != 0:
        assert result.last_line.startswith("error: "), result.err[-2000:]
        assert len([line for line in result.err.splitlines() if line.startswith("error: ")]) == 1
    for word in case.words:
        assert word in result.last_line, f"{word!r} not in {result.last_line!r}"
    if case.check is not None:
        case.check(tmp_path, result)
