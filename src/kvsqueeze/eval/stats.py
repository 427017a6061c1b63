"""Uncertainty of the report's figures: a bootstrap interval for each mean, and a
paired sign test for "is Ada-KV better than its uniform twin on the same samples".

With 5-30 samples per cell a mean alone hides how much it would move on other
samples; the percentile bootstrap (Efron & Tibshirani, "An Introduction to the
Bootstrap", 1993, ch. 13) needs no distributional assumption, which matters for
scores that are 0/0.5/1 or log-probs with a long negative tail. The sign test
(Dixon & Mood, "The Statistical Sign Test", JASA 1946) is the paired test that
assumes least: only that, without a real difference, a win and a loss are equally
likely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95


def bootstrap_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`. Seeded, so a report
    rebuilt from the same rows shows the same interval. One value gives a zero-width
    interval at it: there is nothing to resample."""
    if not values:
        raise ValueError("a bootstrap interval needs at least one value")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    data = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(data), size=(resamples, len(data)))
    means = data[draws].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedComparison:
    """How often A beat B on the same samples, and how surprising that split is if
    neither is better (two-sided exact sign test; ties carry no sign and are left out)."""

    wins: int
    ties: int
    losses: int

    @property
    def p_value(self) -> float:
        return sign_test(self.wins, self.losses)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability, under a fair coin over the
    wins + losses untied pairs, of a split at least as uneven as this one."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare_paired(a: Sequence[float], b: Sequence[float], tie: float = 0.0) -> PairedComparison:
    """Wins / ties / losses of a[i] against b[i] (higher is better); |a - b| <= tie
    is a tie, so that rounding noise is not counted as a win."""
    if len(a) != len(b):
        raise ValueError(f"paired values must have the same length, got {len(a)} and {len(b)}")
    if tie < 0:
        raise ValueError(f"the tie tolerance must be >= 0, got {tie}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    wins = sum(d > tie for d in diffs)
    losses = sum(d < -tie for d in diffs)
    return PairedComparison(wins=wins, ties=len(diffs) - wins - losses, losses=losses)
