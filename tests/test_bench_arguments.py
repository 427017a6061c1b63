"""bench/arguments.py: a benchmark's count flags refuse 0 and negatives with argparse's message."""

from __future__ import annotations

import argparse

import pytest

from kvsqueeze.bench.arguments import positive_int


def test_positive_int_takes_counts_and_names_bad_ones(capsys):
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--steps", type=positive_int)
    assert parser.parse_args(["--steps", "3"]).steps == 3
    for bad in ("0", "-2"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--steps", bad])
        assert f"--steps: must be at least 1, not {int(bad)}" in capsys.readouterr().err
