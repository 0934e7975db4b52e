"""Rows of tests/test_bad_input.py: training."""

from tests.bad_input import Case

CASES: list[Case] = []
