"""Rows of tests/test_bad_input.py: evaluation."""

from tests.bad_input import Case

CASES: list[Case] = []
