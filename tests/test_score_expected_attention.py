"""Expected Attention: the closed form E[exp(s q.k)] = exp(s mu.k + s^2/2 k'Sk) checked
against hand-made query statistics, and against sampling."""

from __future__ import annotations

import math

import pytest
import torch

from kvsqueeze.policy import ScoreInput, make_policy
from kvsqueeze.policy.score import SCORERS, ExpectedAttentionScorer


def two_query_pattern() -> ScoreInput:
    """One head, head_dim 2, scaling 1, four keys. The two recent queries are (2, 1) and
    (2, -1): mean (2, 0), variance 1 along the second axis only. Keys: e1 (hit by the
    mean), e2 (hit only by the spread), -e1, and 0. Values have norms 1, 1, 1, 3."""
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])[None, None]
    values = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, 0.0]])[None, None]
    queries = torch.zeros(1, 1, 4, 2)
    queries[0, 0, 2] = torch.tensor([2.0, 1.0])
    queries[0, 0, 3] = torch.tensor([2.0, -1.0])
    return ScoreInput(queries, keys, values, torch.ones(1, 4, dtype=torch.bool), scaling=1.0)


def test_expected_logits_are_mean_plus_half_variance():
    x = two_query_pattern()
    # Expected logits: e1: 2 + 0, e2: 0 + 1/2, -e1: -2 + 0, 0: 0.
    logits = [2.0, 0.5, -2.0, 0.0]
    z = sum(math.exp(v) for v in logits)
    attention = [math.exp(v) / z for v in logits]
    got = ExpectedAttentionScorer(recent=2, value_norm=False)(x)[0, 0]
    torch.testing.assert_close(got, torch.tensor(attention))
    # The spread alone ranks e2 above the null key, which the mean alone cannot.
    assert got[1] > got[3]
    weighted = ExpectedAttentionScorer(recent=2)(x)[0, 0]
    torch.testing.assert_close(weighted, torch.tensor(attention) * torch.tensor([1.0, 1.0, 1.0, 3.0]))


def test_closed_form_matches_sampled_future_queries():
    gen = torch.Generator().manual_seed(0)
    d, t = 4, 6
    keys = torch.randn(1, 1, t, d, generator=gen)
    recent = torch.randn(1, 1, 64, d, generator=gen) * 0.7 + 0.3
    # 64 prompt tokens: the recent queries are all of them; the first t keys are scored
    # (the zero keys after them only add to the softmax's denominator).
    all_keys = torch.cat([keys, torch.zeros(1, 1, 64 - t, d)], dim=2)
    x = ScoreInput(recent, all_keys, all_keys.clone(), torch.ones(1, 64, dtype=torch.bool), scaling=0.5)
    scores = ExpectedAttentionScorer(recent=64, value_norm=False)(x)[0, 0, :t]
    mu = recent[0, 0].mean(dim=0)
    cov = torch.cov(recent[0, 0].T, correction=0)
    samples = torch.distributions.MultivariateNormal(mu, cov).sample((200_000,))
    expected = torch.exp(0.5 * samples @ keys[0, 0].T).mean(dim=0)  # E[exp(s q.k)] per key
    torch.testing.assert_close(scores / scores.sum(), expected / expected.sum(), atol=2e-3, rtol=2e-2)


def test_padding_and_hidden_keys_score_zero_and_padding_queries_are_not_counted():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 10, 8, generator=gen), torch.randn(2, 2, 10, 8, generator=gen)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, :3] = False
    x = ScoreInput(q, k, k.clone(), valid, scaling=8**-0.5, sliding_window=6)
    scores = ExpectedAttentionScorer(recent=16)(x)
    assert bool((scores[:, :, :4] == 0).all())  # padding, and keys the sliding window hides
    assert bool((scores[:, :, 4:] > 0).all())
    # Sequence 1's statistics come from its 7 real queries: the same as scoring them alone.
    alone = ScoreInput(q[1:, :, 3:], k[1:, :, 3:], k[1:, :, 3:].clone(), valid[1:, 3:], 8**-0.5, sliding_window=6)
    torch.testing.assert_close(scores[1:, :, 3:], ExpectedAttentionScorer(recent=16)(alone))


def test_expected_attention_is_registered_and_validates():
    assert SCORERS["expected-attention"] is ExpectedAttentionScorer
    policy = make_policy("ada-expected-attention", keep=0.5, window=0)
    assert isinstance(policy.scorer, ExpectedAttentionScorer)
    assert policy.sinks == 4  # as kvpress: the first tokens are kept whatever they score
    with pytest.raises(ValueError, match="recent"):
        ExpectedAttentionScorer(recent=1)
