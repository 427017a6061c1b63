"""Policy.share_scorer: the allocator splits a layer's budget by one scorer while each
head keeps its best tokens by another; Ada-KV's H2O and head-wise TOVA presets size
their shares by the observation window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from score_cases import random_prefill

from kvsqueeze.policy import Policy, ScoreInput, make_policy
from kvsqueeze.policy.allocate import AdaKVAllocator, CrossLayerAllocator
from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.score import H2OScorer, SnapKVScorer


@dataclass(frozen=True)
class Fixed:
    """A scorer that returns the same scores for every prefill (hand-made patterns)."""

    scores: torch.Tensor
    name: str = "fixed"
    observes_queries: ClassVar[bool] = False

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        return self.scores.expand(x.keys.shape[0], -1, -1)


def one_sequence(t: int = 12, kv_heads: int = 2) -> ScoreInput:
    x = random_prefill(0, q_heads=kv_heads, kv_heads=kv_heads, t=t, pad=0, window=1)
    return ScoreInput(x.queries[:1], x.keys[:1], x.values[:1], x.valid[:1], x.scaling, window=1)


def test_shares_follow_the_share_scorer_and_tokens_follow_the_scorer():
    # Own scores: head 0 is flat, head 1 peaked on token 3, so Ada by its own scores
    # gives head 0 almost everything. The share scorer says the opposite (head 1 spread,
    # head 0 peaked on token 5). Selection within each head still follows the own scores.
    own = torch.full((1, 2, 12), 0.1)
    own[0, 0] = torch.linspace(0.2, 0.1, 12)  # head 0 prefers early tokens
    own[0, 1] = 0.001
    own[0, 1, 3] = 0.9
    shares = torch.full((1, 2, 12), 0.1)
    shares[0, 0] = 0.001
    shares[0, 0, 5] = 0.9
    ada = AdaKVAllocator(alpha=0.0, pool_kernel=1)
    x = one_sequence()
    by_own = Policy("own", Fixed(own), Budget(tokens=5), allocator=ada, window=1).keep_mask(x, 0, 1)
    by_shares = Policy(
        "shares", Fixed(own), Budget(tokens=5), allocator=ada, window=1, share_scorer=Fixed(shares)
    ).keep_mask(x, 0, 1)
    assert by_own.sum(dim=-1).tolist() == [[8, 2]]  # head 1: its window token and its peak
    assert by_shares.sum(dim=-1).tolist() == [[2, 8]]
    # Head 0's two slots: its protected last token and its own best (token 0, not the
    # share scorer's token 5); head 1's eight include its own peak.
    assert by_shares[0, 0].nonzero().flatten().tolist() == [0, 11]
    assert bool(by_shares[0, 1, 3]) and bool(by_shares[0, 1, 11])


def test_share_scorer_sees_the_same_protected_and_hidden_tokens():
    x = random_prefill(3, q_heads=4, kv_heads=2, t=30, pad=6, window=4)
    policy = Policy(
        "p", H2OScorer(), Budget(tokens=10), allocator=AdaKVAllocator(), window=4, share_scorer=SnapKVScorer()
    )
    keep = policy.keep_mask(x, 0, 1)
    assert not bool(keep[1, :, :6].any())  # never padding
    assert bool(keep[:, :, -4:].all())  # the window in every head
    assert keep.sum(dim=(1, 2)).tolist() == [20, 20]  # the uniform layer total


def test_cross_layer_allocation_ranks_the_share_scores():
    layers = {i: random_prefill(i, q_heads=4, kv_heads=2, t=24, pad=3, window=4) for i in range(3)}
    policy = Policy(
        "p",
        H2OScorer(),
        Budget(tokens=8),
        allocator=CrossLayerAllocator(),
        window=4,
        share_scorer=SnapKVScorer(),
    )
    keeps = policy.keep_masks(layers, 3)
    assert sum(int(k.sum()) for k in keeps.values()) == 3 * 2 * 2 * 8
    assert all(not bool(k[1, :, :3].any()) for k in keeps.values())


@pytest.mark.parametrize("name", ["ada-h2o", "ada-tova-head", "cross-h2o"])
def test_presets_off_the_window_share_by_the_window(name):
    policy = make_policy(name, keep=0.25)
    assert isinstance(policy.share_scorer, SnapKVScorer)
    assert (policy.share_scorer.pool, policy.share_scorer.kernel) == ("max", 7)


@pytest.mark.parametrize("name", ["h2o", "tova-head", "ada-snapkv", "ada-kvzip", "ada-tova"])
def test_other_presets_share_by_their_own_scores(name):
    assert make_policy(name, keep=0.25).share_scorer is None
