"""The batched padded path (multi-token chunks on the GPU, the paged reference, the
engine's decode) against the per-head reference, and a loud fallback without triton."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from kvsqueeze.ops import _triton
from kvsqueeze.ops.padded_attention import padded_attention
from kvsqueeze.ops.ragged_attention import ragged_attention_reference
from kvsqueeze.store import FlatKV


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_padded_gather_equals_per_head_reference(sliding_window):
    g = torch.Generator().manual_seed(0)
    heads, t, d, group, q = 4, 20, 8, 3, 6
    keys, values = torch.randn(heads, t, d, generator=g), torch.randn(heads, t, d, generator=g)
    keep = torch.rand(heads, t, generator=g) < 0.5
    keep[0] = False  # an empty head: its queries see only the new chunk
    kv = FlatKV.from_dense(keys, values, keep)
    new_k, new_v = torch.randn(heads, q, d, generator=g), torch.randn(heads, q, d, generator=g)
    positions = torch.arange(t, t + q)
    kv.append(new_k, new_v, positions)
    query = torch.randn(heads, group, q, d, generator=g)
    q_pos = positions.expand(heads, q)
    want = ragged_attention_reference(query, kv, q_pos, 0.3, sliding_window)
    got = padded_attention(query, *kv.padded(), q_pos, 0.3, sliding_window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A query older than every entry sees nothing: zeros, not NaN.
    early = padded_attention(query[:, :, :1], *kv.padded(), torch.full((heads, 1), -1), 0.3)
    assert torch.equal(early, torch.zeros_like(early))


def test_cuda_without_triton_warns_once(monkeypatch):
    monkeypatch.setattr(_triton, "triton_available", lambda: False)
    _triton._warn_no_triton.cache_clear()
    fake_cuda = types.SimpleNamespace(is_cuda=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert not _triton.use_triton(fake_cuda)
        assert not _triton.use_triton(fake_cuda)
    assert len([w for w in seen if "triton is not importable" in str(w.message)]) == 1
    assert not _triton.use_triton(torch.zeros(1))  # CPU tensors: no warning, no triton
