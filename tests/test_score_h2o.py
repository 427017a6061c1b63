"""H2O divides the accumulated attention by the number of queries that saw each key
(kvpress's observed attention): on a hand-made pattern the plain sum prefers the first
token over a late needle that every observer attends to, the normalised score does not."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.policy import ScoreInput
from kvsqueeze.policy.score import H2OScorer
from kvsqueeze.policy.score.h2o import observers

T, NEEDLE, LOGIT = 16, 12, 3.0


def needle_pattern() -> ScoreInput:
    """One head, keys e_0..e_15, scaling 1: every query attends uniformly to the keys it
    sees, except that queries from the needle (token 12) on add logit 3 on it."""
    keys = torch.eye(T)[None, None]
    queries = torch.zeros(1, 1, T, T)
    queries[0, 0, NEEDLE:, NEEDLE] = LOGIT
    return ScoreInput(queries, keys, keys.clone(), torch.ones(1, T, dtype=torch.bool), scaling=1.0, window=1)


def hand_attention() -> list[list[float]]:
    """probs[q][k] of the pattern, in plain Python."""
    rows = []
    for q in range(T):
        logits = [LOGIT if (k == NEEDLE and q >= NEEDLE) else 0.0 for k in range(q + 1)]
        exps = [math.exp(v) for v in logits]
        rows.append([e / sum(exps) for e in exps] + [0.0] * (T - q - 1))
    return rows


def test_normalised_h2o_keeps_the_late_needle_the_plain_sum_drops():
    probs = hand_attention()
    sums = [sum(probs[q][k] for q in range(T)) for k in range(T)]
    means = [sums[k] / (T - k) for k in range(T)]
    assert max(range(T), key=sums.__getitem__) == 0  # the bias: the first token wins the plain sum
    assert sums[NEEDLE] < sums[0]
    scores = H2OScorer()(needle_pattern())[0, 0]
    torch.testing.assert_close(scores, torch.tensor(means))
    assert int(scores.argmax()) == NEEDLE


def test_observers_count_real_queries_with_padding_and_sliding_window():
    valid = torch.tensor([[True] * 6, [False, False] + [True] * 4])
    x = ScoreInput(torch.zeros(2, 1, 6, 2), torch.zeros(2, 1, 6, 2), torch.zeros(2, 1, 6, 2), valid, 1.0)
    assert observers(x).tolist() == [[6, 5, 4, 3, 2, 1], [0, 0, 4, 3, 2, 1]]
    windowed = ScoreInput(x.queries, x.keys, x.values, valid, 1.0, sliding_window=3)
    assert observers(windowed).tolist() == [[3, 3, 3, 3, 2, 1], [0, 0, 3, 3, 2, 1]]


@pytest.mark.parametrize("chunk", [5, 512])
def test_h2o_is_the_mean_attention_over_observers_with_padding(chunk):
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 12, 8, generator=gen), torch.randn(2, 2, 12, 8, generator=gen)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :4] = False
    x = ScoreInput(q, k, k.clone(), valid, scaling=8**-0.5, window=1)
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8**-0.5
    allowed = torch.ones(12, 12, dtype=torch.bool).tril()[None] & valid[:, None, :] & valid[:, :, None]
    probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    seen = allowed.sum(dim=1).clamp_min(1)  # [b, keys]
    expected = (probs.sum(dim=2) / seen[:, None]).view(2, 2, 2, 12).mean(dim=2)
    torch.testing.assert_close(H2OScorer(chunk=chunk)(x), expected)
