"""Inputs and checks the scorer tests share (imported by test_score_*.py)."""

from __future__ import annotations

import torch

from kvsqueeze.policy import Policy, ScoreInput, make_policy
from kvsqueeze.policy.budget import Budget


def random_prefill(
    seed: int, q_heads: int = 4, kv_heads: int = 2, t: int = 20, pad: int = 5, window: int = 6, q_scale: float = 1.0
) -> ScoreInput:
    """Two sequences of t tokens with GQA (q_heads over kv_heads), head dim 8; sequence 1
    starts with `pad` padding slots."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_heads, t, 8, generator=gen) * q_scale
    k, v = torch.randn(2, kv_heads, t, 8, generator=gen), torch.randn(2, kv_heads, t, 8, generator=gen)
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :pad] = False
    return ScoreInput(q, k, v, valid, scaling=8**-0.5, window=window)


def kept_with_one_slot(x: ScoreInput, *scorers) -> dict[str, set[int]]:
    """What each scorer keeps of head 0 when the budget leaves one slot beside the
    protected last token."""
    kept = {}
    for scorer in scorers:
        keep = Policy(scorer.name, scorer, budget=Budget(tokens=2), window=1).keep_mask(x, 0, 1)[0, 0]
        kept[scorer.name] = set(keep.nonzero().flatten().tolist())
    return kept


def check_preset_keeps_the_budget(name: str, scorer_type: type, **options) -> Policy:
    """The preset builds `scorer_type`, never keeps padding, and keeps exactly 12 tokens
    per head (uniform) or the uniform layer total of 36 (ada-)."""
    x = random_prefill(1, q_heads=6, kv_heads=3, t=40, pad=7, window=4)
    policy = make_policy(name, tokens=12, window=4, **options)
    assert type(policy.scorer) is scorer_type
    keep = policy.keep_mask(x, 0, 1)
    assert not bool(keep[1, :, :7].any())  # never padding
    if name.startswith("ada-"):  # Ada-KV moves budget between heads; the layer's total stays the uniform one
        assert keep.sum(dim=(1, 2)).tolist() == [36, 36]
    else:
        assert bool((keep.sum(dim=-1) == 12).all())
    return policy
