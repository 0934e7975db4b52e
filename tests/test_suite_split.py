"""The test-fast split (tests/conftest.py): a test that starts a process without the slow mark fails, with the mark
it runs."""

import pytest

from .conftest import ROOT

pytest_plugins = ["pytester"]

TESTS = """
import subprocess, sys

import pytest


def test_unmarked():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.mark.slow
def test_marked():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_no_process():
    assert sum(range(4)) == 6
"""


@pytest.mark.slow  # its inner test_marked starts a process
def test_a_process_needs_the_slow_mark(pytester):
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_split=TESTS)
    result = pytester.runpytest_inprocess("-p", "no:xdist", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_unmarked starts a process*mark it @pytest.mark.slow*"])
    fast = pytester.runpytest_inprocess("-p", "no:xdist", "-p", "no:cacheprovider", "-m", "not slow")
    fast.assert_outcomes(passed=1, failed=1, deselected=1)
