"""The dense prefill path builds its mask in blocks of query rows, never [t, t] at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.ops import dense_attention
from kvsqueeze.ops.dense_attention import dense_causal_attention


# (Unpadded, windowless prefill takes the fused causal path: no mask at all.)
@pytest.mark.parametrize(("sliding_window", "padded"), [(None, True), (6, True), (6, False)])
def test_blocked_mask_equals_one_block_and_bounds_mask_size(monkeypatch, sliding_window, padded):
    b, hq, hkv, t, d = 2, 4, 2, 23, 8
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(b, hq, t, d, generator=gen),
        torch.randn(b, hkv, t, d, generator=gen),
        torch.randn(b, hkv, t, d, generator=gen),
    )
    valid = (torch.arange(t)[None, :] >= torch.tensor([[0], [9]])) if padded else None
    whole = dense_causal_attention(q, k, v, valid, 0.3, sliding_window)

    shapes: list[tuple[int, ...]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        shapes.append(tuple(attn_mask.shape))
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(dense_attention, "MASK_BLOCK", 5)
    monkeypatch.setattr(dense_attention.F, "scaled_dot_product_attention", spy)
    blocked = dense_causal_attention(q, k, v, valid, 0.3, sliding_window)
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=1e-5)
    assert len(shapes) == 5 and max(s[-2] for s in shapes) <= 5
    if sliding_window is not None:  # a block only sees its window's keys
        assert max(s[-1] for s in shapes) <= 5 + sliding_window - 1
