"""DefensiveKV: the most attention any window query (of any head of the GQA group) pays a
key, floored at the prefix mean, so a key one recent query needs strongly is kept where
the window's mean (SnapKV) would drop it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from score_cases import check_preset_keeps_the_budget, kept_with_one_slot, random_prefill

from kvsqueeze.policy import ScoreInput, make_policy
from kvsqueeze.policy.score import SCORERS, DefensiveKVScorer, SnapKVScorer

A, B = 5, 14  # A: needed strongly by one window query; B: moderately by all of them


def one_query_pattern(window: int = 4) -> ScoreInput:
    """24 tokens, one head, keys e_0..e_23 (values too), scaling 1. The first window query
    puts logit 6 on token A; every window query puts logit 2.5 on token B; 0 elsewhere."""
    t = 24
    keys = torch.eye(t)[None, None]
    queries = torch.zeros(1, 1, t, t)
    queries[0, 0, t - window, A] = 6.0
    queries[0, 0, t - window :, B] = 2.5
    return ScoreInput(queries, keys, keys.clone(), torch.ones(1, t, dtype=torch.bool), scaling=1.0, window=window)


def test_a_key_one_query_needs_beats_one_the_mean_prefers():
    x = one_query_pattern()
    for pool in ("none", "avg"):
        snap = SnapKVScorer(pool=pool)(x)[0, 0]
        defensive = DefensiveKVScorer(pool=pool)(x)[0, 0]
        assert snap[B] > snap[A]
        assert defensive[A] > defensive[B]
    # One slot beside the protected last token: SnapKV keeps B, DefensiveKV keeps A.
    kept = kept_with_one_slot(x, SnapKVScorer(pool="none"), DefensiveKVScorer(pool="none"))
    assert kept == {"snapkv": {B, 23}, "defensivekv": {A, 23}}


def rows_max(x: ScoreInput) -> torch.Tensor:
    """[b, kv_heads, t]: softmax rows of the window's queries over causal real keys, written
    out, and their max over the window and the GQA group."""
    b, hq, t, _ = x.queries.shape
    w = x.window
    keys = x.keys.repeat_interleave(x.group_size, dim=1)
    logits = x.queries[:, :, t - w :] @ keys.transpose(-1, -2) * x.scaling  # [b, hq, w, t]
    causal = torch.arange(t)[None, :] <= torch.arange(t - w, t)[:, None]
    logits = logits.masked_fill(~(causal[None] & x.valid[:, None, :])[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return probs.amax(dim=2).view(b, x.keys.shape[1], x.group_size, t).amax(dim=2)


def floored(worst: torch.Tensor, x: ScoreInput) -> torch.Tensor:
    """The floor at the mean over the prefix's real keys; 0 on padding."""
    prefix = x.valid[:, None, : x.valid.shape[1] - x.window].float()
    floor = (worst[..., : prefix.shape[-1]] * prefix).sum(dim=-1, keepdim=True) / prefix.sum(dim=-1, keepdim=True)
    return torch.maximum(worst, floor) * x.valid[:, None, :]


def test_max_over_window_and_group_floored_at_the_prefix_mean():
    x = random_prefill(0, q_scale=2.0)
    expected = floored(rows_max(x), x)
    torch.testing.assert_close(DefensiveKVScorer(pool="none", value_norm=False)(x), expected)
    weighted = DefensiveKVScorer(pool="none")(x)
    torch.testing.assert_close(weighted, expected * x.values.abs().sum(dim=-1))
    assert bool((weighted[1, :, :5] == 0).all())  # padding scores 0
    # The floor: no real key scores below it, and the prefix keys below it tie there.
    floor = expected[0, :, :14].amin(dim=-1, keepdim=True)
    assert bool((expected[0] >= floor).all())
    assert int((expected[0, :, :14] == floor).sum()) > 2


def test_each_query_row_is_pooled_along_the_prefix_before_the_max():
    # With max pooling, pooling every row and then taking the max over rows is max-pooling
    # the rows' max; the window's own keys stay unpooled, as in SnapKV.
    x = random_prefill(2, q_scale=2.0)
    worst = rows_max(x)
    pooled = F.max_pool1d(worst[..., :14].reshape(4, 1, 14), kernel_size=3, stride=1, padding=1).view(2, 2, 14)
    expected = floored(torch.cat([pooled, worst[..., 14:]], dim=-1), x)
    torch.testing.assert_close(DefensiveKVScorer(pool="max", kernel=3, value_norm=False)(x), expected)


@pytest.mark.parametrize("name", ["defensivekv", "ada-defensivekv"])
def test_presets_keep_exactly_the_budget(name):
    check_preset_keeps_the_budget(name, DefensiveKVScorer, group_reduce="mean")  # the group is always max-reduced


def test_registered_and_validates():
    assert SCORERS["defensivekv"] is DefensiveKVScorer
    assert make_policy("defensivekv", keep=0.5, pooling="max", kernel=7).scorer == DefensiveKVScorer(
        kernel=7, pool="max"
    )
    with pytest.raises(ValueError, match="kernel"):
        DefensiveKVScorer(kernel=4)
    with pytest.raises(ValueError, match="pooling"):
        DefensiveKVScorer(pool="median")
