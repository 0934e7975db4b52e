"""Rows of tests/test_bad_input.py: data."""

from tests.bad_input import Case

CASES: list[Case] = []
