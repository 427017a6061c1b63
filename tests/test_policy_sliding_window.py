"""Sliding-window layers: scorers see only what the window shows, and a policy never
keeps a key the window already hides from the last prompt query (no later query can
attend to it). Checked on the kept set, on random tensors, on a tiny Mistral, and for
the fused Triton SnapKV scorer through Triton's CPU interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvsqueeze.hf.kvzip import needs_reconstruction
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.tiny import tiny_model
from kvsqueeze.policy import ScoreInput, make_policy, policy_names
from kvsqueeze.policy.score import H2OScorer, SnapKVScorer, attention_probs

SLIDING = 16


def make_input(n_valid: list[int], t: int, window: int = 4, sliding: int | None = SLIDING, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, d = len(n_valid), 4, 2, 16
    queries = torch.randn(b, hq, t, d, generator=gen)
    keys = torch.randn(b, hkv, t, d, generator=gen)
    valid = torch.arange(t)[None, :] >= (t - torch.tensor(n_valid))[:, None]
    return ScoreInput(queries, keys, keys, valid, d**-0.5, window, sliding)


def test_attention_probs_mask_keys_outside_the_sliding_window():
    x = make_input([60, 41], t=60)
    probs = attention_probs(x, 0, 60)  # [b, hkv, g, q, t]
    q, k = torch.arange(60)[:, None], torch.arange(60)[None, :]
    hidden = (q - k >= SLIDING) | (k > q)
    assert bool((probs[..., hidden] == 0).all())
    rows = probs.sum(dim=-1)
    torch.testing.assert_close(rows[0], torch.ones_like(rows[0]))
    # Unlike the full causal softmax: mass moves onto the keys inside the window.
    full = attention_probs(dataclasses.replace(x, sliding_window=None), 0, 60)
    assert (full - probs).abs().max() > 0.01


# kvzip scores by a context reconstruction the model runs (hf/kvzip.py): not a direct keep_mask.
DIRECT = [n for n in policy_names() if not needs_reconstruction(make_policy(n))]


@pytest.mark.parametrize("name", [n for n in DIRECT if n != "full"])
def test_nothing_the_window_hides_is_kept(name):
    x = make_input([120, 90], t=120, window=4)
    visible = torch.arange(120) >= 120 - SLIDING
    for keep, tokens in ((0.25, None), (None, 6)):
        policy = make_policy(name, keep=keep, tokens=tokens, window=4)
        mask = policy.keep_masks({0: x}, 1)[0]
        assert not bool(mask[..., ~visible].any()), "a key hidden from the last prompt query was kept"
        per_head = mask.sum(dim=-1)
        if tokens is None:  # 30 and 22 tokens of budget: all 16 visible tokens fit, all are kept
            assert bool(mask[..., visible].all())
        else:  # budgets count only visible tokens: still exactly `tokens` per head on average
            assert per_head.sum(dim=-1).tolist() == [2 * tokens, 2 * tokens]


def test_h2o_accumulates_only_attention_the_window_allows():
    x = make_input([64], t=64)
    scores = H2OScorer()(x)
    # Key j is seen by queries j .. j + SLIDING - 1 only: its mass is divided by that many.
    seen = (64 - torch.arange(64)).clamp_max(SLIDING)
    torch.testing.assert_close(scores, attention_probs(x, 0, 64).sum(dim=3).mean(dim=2) / seen)
    assert float(scores.max()) <= 1.0


def test_tiny_mistral_sliding_window_keeps_only_visible_tokens():
    """The issue's case: tiny Mistral, sliding_window=16, 120-token prompt, snapkv keep
    0.25 (30 per head), window 4. Before the fix most heads kept ~26 of 30 entries older
    than the window and only 4 of the visible ones."""
    model = tiny_model("mistral", num_layers=2)
    model.config.sliding_window = SLIDING
    prompt = torch.randint(3, 259, (1, 120), generator=torch.Generator().manual_seed(0))
    record = record_prefill(model, prompt)
    policy = make_policy("snapkv", keep=0.25, window=4)
    for layer_idx, x in enumerate(record.layers):
        assert x.sliding_window == SLIDING, "the model's window reaches the scorer"
        kept = policy.keep_mask(dataclasses.replace(x, window=4), layer_idx, len(record.layers))
        slots = kept[0].nonzero()[:, 1]
        assert int(slots.min()) >= 120 - SLIDING, "nothing older than the sliding window is kept"
        assert kept[0].sum(dim=-1).tolist() == [SLIDING] * kept.shape[1], "every visible token fits the budget"


def test_tiny_mistral_sliding_window_below_budget_scores_only_visible_tokens():
    model = tiny_model("mistral", num_layers=2)
    model.config.sliding_window = SLIDING
    prompt = torch.randint(3, 259, (1, 120), generator=torch.Generator().manual_seed(1))
    record = record_prefill(model, prompt)
    policy = make_policy("ada-snapkv", tokens=8, window=4)
    for layer_idx, x in enumerate(record.layers):
        kept = policy.keep_mask(dataclasses.replace(x, window=4), layer_idx, len(record.layers))
        assert int(kept[0].nonzero()[:, 1].min()) >= 120 - SLIDING
        assert int(kept.sum()) == 8 * kept.shape[1]


# ------------------------------------------------------------------ the fused scorer
triton = pytest.importorskip("triton")
from kvsqueeze.ops import triton_snapkv  # noqa: E402


@pytest.mark.parametrize(("group", "window", "t", "sliding"), [(1, 8, 50, 16), (3, 5, 77, 9), (4, 16, 40, 3)])
def test_triton_snapkv_masks_the_sliding_window(group, window, t, sliding):
    gen = torch.Generator().manual_seed(group)
    b, hkv, d = 2, 2, 32
    queries = torch.randn(b, hkv * group, t, d, generator=gen)
    keys = torch.randn(b, hkv, t, d, generator=gen)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :9] = False
    x = ScoreInput(queries, keys, keys, valid, d**-0.5, window, sliding)
    sums = triton_snapkv.window_attention_sums(queries, keys, valid, d**-0.5, window, sliding, chunk=16)
    expected = attention_probs(x, t - window, t).sum(dim=3).flatten(1, 2)
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=1e-4)
    assert bool((sums[..., : t - window - sliding + 1] == 0).all()), "keys no window query sees get nothing"
    for scorer in (SnapKVScorer(), SnapKVScorer(pool="avg", pool_order="reduce-then-pool")):
        torch.testing.assert_close(triton_snapkv.snapkv_scores_for(scorer, x), scorer(x), atol=1e-5, rtol=1e-4)
