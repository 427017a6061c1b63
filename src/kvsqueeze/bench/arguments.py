"""Argument types shared by the benchmark scripts (benchmarks/): a bad count gets
argparse's clear message, not a traceback from deep inside a run."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An int of at least 1, for argparse's `type=`."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
