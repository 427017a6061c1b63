"""TOVA is layer-wise: the last query's attention averaged over every head of the layer,
checked on a hand-made attention pattern whose answer is known."""

from __future__ import annotations

import math

import torch

from kvsqueeze.policy import Policy, ScoreInput, make_policy
from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.score import TOVAHeadScorer, TOVAScorer


def two_head_pattern() -> ScoreInput:
    """Eight tokens, two kv heads (one query head each), head_dim 8, scaling 1.

    Keys are basis vectors, so the last query's logit on token j is its coordinate j.
    Head 0's last query puts a large logit on token 2; head 1's spreads two medium
    logits over tokens 4 and 5. Every other query is zero (irrelevant to TOVA)."""
    t, d = 8, 8
    keys = torch.eye(d)[None, None].repeat(1, 2, 1, 1)  # token j's key = e_j in both heads
    queries = torch.zeros(1, 2, t, d)
    queries[0, 0, -1, 2] = 6.0
    queries[0, 1, -1, 4] = 3.0
    queries[0, 1, -1, 5] = 3.0
    valid = torch.ones(1, t, dtype=torch.bool)
    return ScoreInput(queries, keys, keys.clone(), valid, scaling=1.0, window=1)


def softmax(logits: list[float]) -> list[float]:
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


def test_tova_averages_the_last_query_over_all_heads_of_the_layer():
    x = two_head_pattern()
    head0 = softmax([0, 0, 6, 0, 0, 0, 0, 0])
    head1 = softmax([0, 0, 0, 0, 3, 3, 0, 0])
    expected = torch.tensor([(a + b) / 2 for a, b in zip(head0, head1, strict=True)])
    scores = TOVAScorer()(x)
    assert scores.shape == (1, 2, 8)
    torch.testing.assert_close(scores[0, 0], expected)
    torch.testing.assert_close(scores[0, 1], expected)  # one ranking for the whole layer


def test_tova_keeps_the_same_tokens_in_every_head():
    # Budget 3 = the last token (window 1) + the two best of the layer average: token 2
    # (about 0.50) beats tokens 4 and 5 (about 0.22 each). Head-wise, head 1
    # would have kept 4 and 5 instead; layer-wise both heads keep {2, 4 or 5, 7}.
    x = two_head_pattern()
    keep = Policy("tova", TOVAScorer(), budget=Budget(tokens=3), window=1).keep_mask(x, 0, 1)
    assert torch.equal(keep[0, 0], keep[0, 1])
    assert keep[0, 0, 2] and keep[0, 0, 7] and (keep[0, 0, 4] or keep[0, 0, 5])
    assert int(keep[0, 0].sum()) == 3


def test_tova_ignores_padding_and_gqa_groups_average_too():
    # GQA: 4 query heads over 2 kv heads; the score is the mean of all 4 query heads.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=gen)
    k = torch.randn(2, 2, 10, 8, generator=gen)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    x = ScoreInput(q, k, k.clone(), valid, scaling=8**-0.5, window=1)
    scores = TOVAScorer()(x)
    logits = q[:, :, -1:] @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8**-0.5
    probs = torch.softmax(logits.masked_fill(~valid[:, None, None], float("-inf")), dim=-1)[:, :, 0]
    torch.testing.assert_close(scores[:, 0], probs.mean(dim=1))
    assert bool((scores[1, :, :3] == 0).all())


def test_tova_head_ranks_each_head_by_its_own_last_query():
    x = two_head_pattern()
    scores = TOVAHeadScorer()(x)
    torch.testing.assert_close(scores[0, 0], torch.tensor(softmax([0, 0, 6, 0, 0, 0, 0, 0])))
    torch.testing.assert_close(scores[0, 1], torch.tensor(softmax([0, 0, 0, 0, 3, 3, 0, 0])))
    keep = Policy("tova-head", TOVAHeadScorer(), budget=Budget(tokens=3), window=1).keep_mask(x, 0, 1)
    assert keep[0, 1, 4] and keep[0, 1, 5] and not keep[0, 1, 2]  # head 1 keeps its own pair
    assert make_policy("ada-tova-head", keep=0.5).scorer == TOVAHeadScorer()
