"""attention_probs masks only the columns a query range can have hidden: for any range
of queries, with and without padding and a sliding window, it equals the softmax under
the full causal mask."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.policy import ScoreInput
from kvsqueeze.policy.score import attention_probs

T = 24


def prefill(pad: int, sliding_window: int | None) -> ScoreInput:
    gen = torch.Generator().manual_seed(3)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :pad] = False
    keys = torch.randn(2, 2, T, 8, generator=gen)
    return ScoreInput(torch.randn(2, 4, T, 8, generator=gen), keys, keys.clone(), valid, 8**-0.5, 4, sliding_window)


def full_mask_probs(x: ScoreInput, start: int, end: int) -> torch.Tensor:
    """[b, kv_heads, group, queries, T] under the whole [queries, T] mask; padding
    queries' rows are 0."""
    q = x.queries[:, :, start:end].view(2, 2, 2, end - start, 8)
    logits = q @ x.keys[:, :, None].transpose(-1, -2) * x.scaling
    behind = torch.arange(start, end)[:, None] - torch.arange(T)[None, :]
    allowed = (behind >= 0) & (behind < (x.sliding_window or T))
    allowed = allowed[None] & x.valid[:, None, :]
    return torch.softmax(logits.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1).nan_to_num(0.0)


@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("start, end", [(0, T), (7, 15), (T - 1, T)])
def test_attention_probs_equal_the_full_mask(pad, sliding_window, start, end):
    x = prefill(pad, sliding_window)
    torch.testing.assert_close(attention_probs(x, start, end), full_mask_probs(x, start, end))
