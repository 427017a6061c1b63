"""CriticalKV: attention times the value's L1 norm, so a key with a large value outranks
one with slightly more attention and a tiny value, where SnapKV chooses the other."""

from __future__ import annotations

import pytest
import torch
from score_cases import check_preset_keeps_the_budget, kept_with_one_slot, random_prefill

from kvsqueeze.policy import ScoreInput, make_policy
from kvsqueeze.policy.score import SCORERS, CriticalKVScorer, SnapKVScorer

A, B = 5, 14  # A: a bit more attention, a tiny value; B: a bit less attention, a large value


def big_value_pattern(window: int = 4) -> ScoreInput:
    """24 tokens, one head, keys e_0..e_23, scaling 1. Every window query puts logit 2.6
    on token A and 2.5 on token B, 0 elsewhere. Values have L1 norm 1, except A's (0.01)
    and B's (10)."""
    t = 24
    keys = torch.eye(t)[None, None]
    queries = torch.zeros(1, 1, t, t)
    queries[0, 0, t - window :, A] = 2.6
    queries[0, 0, t - window :, B] = 2.5
    values = torch.full((1, 1, t, t), 1.0 / t)
    values[0, 0, A] *= 0.01
    values[0, 0, B] *= 10.0
    return ScoreInput(queries, keys, values, torch.ones(1, t, dtype=torch.bool), scaling=1.0, window=window)


def test_a_large_value_outweighs_slightly_more_attention():
    x = big_value_pattern()
    for pool in ("none", "avg"):
        snap = SnapKVScorer(pool=pool)(x)[0, 0]
        critical = CriticalKVScorer(pool=pool)(x)[0, 0]
        assert snap[A] > snap[B]
        assert critical[B] > critical[A]
    # One slot beside the protected last token: SnapKV keeps A, CriticalKV keeps B.
    kept = kept_with_one_slot(x, SnapKVScorer(pool="none"), CriticalKVScorer(pool="none"))
    assert kept == {"snapkv": {A, 23}, "criticalkv": {B, 23}}


@pytest.mark.parametrize("order", ["pool-then-reduce", "reduce-then-pool"])
@pytest.mark.parametrize("how", ["mean", "max"])
def test_score_is_snapkv_plus_epsilon_times_value_l1_norm(how, order):
    x = random_prefill(0)
    v, valid = x.values, x.valid
    scorer = CriticalKVScorer(pool="max", kernel=3, group_reduce=how, pool_order=order, epsilon=1e-3)
    snap = SnapKVScorer(pool="max", kernel=3, group_reduce=how, pool_order=order)(x)
    scores = scorer(x)
    torch.testing.assert_close(scores, (snap + 1e-3) * v.abs().sum(dim=-1) * valid[:, None, :])
    assert bool((scores[1, :, :5] == 0).all())  # padding scores 0


@pytest.mark.parametrize("name", ["criticalkv", "ada-criticalkv"])
def test_presets_keep_exactly_the_budget(name):
    policy = check_preset_keeps_the_budget(name, CriticalKVScorer)
    if name.startswith("ada-"):
        assert policy.scorer.pool_order == "reduce-then-pool"  # Ada-KV's GQA order, as ada-snapkv


def test_registered_and_validates():
    assert SCORERS["criticalkv"] is CriticalKVScorer
    assert make_policy("criticalkv", keep=0.5, pooling="max", kernel=7).scorer.attention == SnapKVScorer(
        kernel=7, pool="max"
    )
    with pytest.raises(ValueError, match="kernel"):
        CriticalKVScorer(kernel=4)
    with pytest.raises(ValueError, match="epsilon"):
        CriticalKVScorer(epsilon=-1.0)
