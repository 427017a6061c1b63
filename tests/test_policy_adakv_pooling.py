"""Ada-KV's allocation on max-pooled scores: a head whose attention is peaked on a few
keys is credited with their neighbourhoods, on a hand-made pair of heads."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.policy import make_policy
from kvsqueeze.policy.allocate import AdaKVAllocator


def peaked_and_flat() -> torch.Tensor:
    """Head 0 puts 0.4 on tokens 2 and 8 and 0.001 elsewhere; head 1 is flat at 0.05."""
    scores = torch.full((1, 2, 12), 0.05)
    scores[0, 0] = 0.001
    scores[0, 0, [2, 8]] = 0.4
    return scores


def test_plain_ada_gives_a_peaked_head_only_its_peaks():
    counts = AdaKVAllocator(alpha=0.0, pool_kernel=1)(peaked_and_flat(), torch.tensor([6]))
    assert counts.tolist() == [[2, 10]]


def test_pooled_allocation_credits_each_peak_with_its_neighbours():
    counts = AdaKVAllocator(alpha=0.0, pool_kernel=3)(peaked_and_flat(), torch.tensor([6]))
    assert counts.tolist() == [[6, 6]]  # 2 peaks x 3 tokens; the layer total is unchanged
    assert AdaKVAllocator(alpha=0.0, pool_kernel=3, safeguard="kvpress")(
        peaked_and_flat(), torch.tensor([6])
    ).tolist() == [[6, 6]]


def test_pooling_keeps_protected_and_hidden_tokens_out_of_the_neighbourhoods():
    scores = peaked_and_flat()
    scores[0, :, 11] = float("inf")  # protected in both heads
    scores[0, :, 0] = float("-inf")  # padding
    scores[0, 0, 10] = 0.001
    counts = AdaKVAllocator(alpha=0.0, pool_kernel=3)(scores, torch.tensor([6]))
    # Token 10 of head 0 does not borrow the protected token's +inf: 1 protected + 6 pooled
    # peak slots in head 0, 1 protected + 4 in head 1.
    assert counts.tolist() == [[7, 5]]
    assert int(counts.sum()) == 12


@pytest.mark.parametrize("kernel", [0, 2])
def test_bad_pool_kernel(kernel):
    with pytest.raises(ValueError, match="kernel"):
        AdaKVAllocator(pool_kernel=kernel)


def test_ada_presets_pool_by_default_and_parity_runs_can_turn_it_off():
    assert make_policy("ada-tova-head", keep=0.5).allocator.pool_kernel == 7
    assert make_policy("ada-snapkv", keep=0.5, ada_pool_kernel=1).allocator.pool_kernel == 1
