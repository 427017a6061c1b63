"""Attention over ragged per-head KV, and dense causal attention, against naive softmax."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.ops import dense_causal_attention, ragged_attention
from kvsqueeze.store import FlatKV

D = 16
SCALE = D**-0.5


def naive_ragged(query, kv: FlatKV, query_positions, scaling, sliding_window=None) -> torch.Tensor:
    """Head by head, query by query, in float64. A query that sees nothing gets zeros."""
    h, g, q, d = query.shape
    out = torch.zeros(h, g, q, d, dtype=torch.float64)
    for head in range(h):
        k, v, p = (x.double() for x in kv.head(head))
        for j in range(q):
            qp = float(query_positions[head, j])
            visible = p <= qp
            if sliding_window is not None:
                visible &= qp - p < sliding_window
            if not bool(visible.any()):
                continue
            logits = query[head, :, j].double() @ k[visible].T * scaling  # [g, n]
            out[head, :, j] = torch.softmax(logits, dim=-1) @ v[visible]
    return out


def make_store(lengths: list[int], t: int, seed: int = 0) -> tuple[FlatKV, torch.Generator]:
    """Heads keep the given number of entries out of t positions (always including the last)."""
    gen = torch.Generator().manual_seed(seed)
    h = len(lengths)
    keys = torch.randn(h, t, D, generator=gen)
    values = torch.randn(h, t, D, generator=gen)
    keep = torch.zeros(h, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, t - 1] = True
        keep[i, torch.randperm(t - 1, generator=gen)[: n - 1]] = True
    return FlatKV.from_dense(keys, values, keep), gen


LENGTHS = [1, 7, 60, 200]  # very different heads
T = 200


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("q", [1, 5])
def test_matches_naive(group, q):
    kv, gen = make_store(LENGTHS, T)
    query = torch.randn(len(LENGTHS), group, q, D, generator=gen)
    if q == 1:
        positions = torch.full((len(LENGTHS), 1), T)
    else:  # queries inside the prompt: causality hides the later entries
        positions = torch.stack([torch.tensor([T - 1, 150, 120, 90, 199])] * len(LENGTHS))[:, :q]
    got = ragged_attention(query, kv, positions, SCALE)
    assert got.shape == query.shape and got.dtype == query.dtype
    torch.testing.assert_close(got.double(), naive_ragged(query, kv, positions, SCALE), atol=1e-5, rtol=1e-5)


def test_causality_is_by_position():
    kv, gen = make_store([50, 50], 50)
    query = torch.randn(2, 2, 3, D, generator=gen)
    positions = torch.tensor([[49, 20, 5], [49, 49, 49]])
    got = ragged_attention(query, kv, positions, SCALE)
    torch.testing.assert_close(got.double(), naive_ragged(query, kv, positions, SCALE), atol=1e-5, rtol=1e-5)
    # Head 0's earlier-positioned queries see fewer entries than if they stood at the end.
    unrestricted = ragged_attention(query, kv, torch.full_like(positions, 49), SCALE)
    assert not torch.allclose(got[0, :, 1:], unrestricted[0, :, 1:], atol=1e-3)
    torch.testing.assert_close(got[1], unrestricted[1])


def test_query_that_sees_nothing_gets_zeros():
    kv, gen = make_store([5, 5], 20)
    first = int(kv.head(0)[2].min())
    query = torch.randn(2, 1, 1, D, generator=gen)
    positions = torch.tensor([[first - 1], [19]])
    got = ragged_attention(query, kv, positions, SCALE)
    assert torch.isfinite(got).all()
    assert bool((got[0] == 0).all())
    torch.testing.assert_close(got.double(), naive_ragged(query, kv, positions, SCALE), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 3])
def test_after_appends_with_free_slots(group):
    kv, gen = make_store([3, 40, 11], 64, seed=2)
    h = 3
    for step in range(23):
        q = 1 + step % 3
        valid = torch.rand(h, q, generator=gen) < 0.7
        positions = (64 + 3 * step + torch.arange(q)).expand(h, q)
        kv.append(torch.randn(h, q, D, generator=gen), torch.randn(h, q, D, generator=gen), positions, valid=valid)
    assert bool((kv.positions < 0).any()), "appends should have left free slots"
    end = 64 + 3 * 23
    query = torch.randn(h, group, 4, D, generator=gen)
    positions = torch.tensor([end, end - 10, end - 40, 70]).expand(h, 4)
    got = ragged_attention(query, kv, positions, SCALE)
    torch.testing.assert_close(got.double(), naive_ragged(query, kv, positions, SCALE), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 16, 64])
def test_sliding_window(window):
    kv, gen = make_store([30, 120, 200], T, seed=3)
    query = torch.randn(3, 3, 4, D, generator=gen)
    positions = torch.tensor([[T, T - 1, 150, 100]] * 3)
    got = ragged_attention(query, kv, positions, SCALE, sliding_window=window)
    expected = naive_ragged(query, kv, positions, SCALE, sliding_window=window)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    if window == 16:  # the window really restricts what is seen
        assert not torch.allclose(got, ragged_attention(query, kv, positions, SCALE), atol=1e-3)


@pytest.mark.parametrize("window", [None, 24])
def test_decode_step_without_mask_matches_masked_path(window):
    """One query newer than every entry takes the unmasked fast path; it must agree
    with the naive masked softmax."""
    kv, gen = make_store(LENGTHS, T, seed=4)
    query = torch.randn(len(LENGTHS), 3, 1, D, generator=gen)
    positions = torch.full((len(LENGTHS), 1), T + 5)
    got = ragged_attention(query, kv, positions, SCALE, sliding_window=window)
    expected = naive_ragged(query, kv, positions, SCALE, sliding_window=window)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_matches_dense_attention_on_an_uncompressed_batch():
    """A batch folded into heads, nothing evicted: ragged equals dense with padding."""
    b, hq, hkv, t = 2, 6, 2, 20
    gen = torch.Generator().manual_seed(6)
    keys, values = torch.randn(b, hkv, t, D, generator=gen), torch.randn(b, hkv, t, D, generator=gen)
    query = torch.randn(b, hq, 1, D, generator=gen)
    valid = torch.arange(t)[None, :] >= torch.tensor([[0], [7]])
    dense = dense_causal_attention(query, keys, values, valid, SCALE)
    keep = valid[:, None, :].expand(b, hkv, t).flatten(0, 1)
    kv = FlatKV.from_dense(keys.flatten(0, 1), values.flatten(0, 1), keep)
    ragged = ragged_attention(query.view(b * hkv, hq // hkv, 1, D), kv, torch.full((b * hkv, 1), t - 1), SCALE)
    torch.testing.assert_close(ragged.view(b, hq, 1, D), dense, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------- dense
def naive_dense(query, keys, values, valid, scaling, sliding_window=None) -> torch.Tensor:
    b, hq, q, d = query.shape
    k_len = keys.shape[2]
    g = hq // keys.shape[1]
    k = keys.double().repeat_interleave(g, dim=1)
    v = values.double().repeat_interleave(g, dim=1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    q_pos = torch.arange(k_len - q, k_len)[:, None]
    k_pos = torch.arange(k_len)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (q_pos - k_pos < sliding_window)
    allowed = allowed[None, None].expand(b, 1, q, k_len)
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
        allowed = allowed | (q_pos == k_pos)[None, None]  # padding queries see themselves
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


@pytest.mark.parametrize("q", [12, 3, 1])
@pytest.mark.parametrize("sliding_window", [None, 4])
@pytest.mark.parametrize("padded", [True, False])
def test_dense_causal_attention_matches_naive(q, sliding_window, padded):
    b, hq, hkv, k_len = 2, 6, 2, 12
    gen = torch.Generator().manual_seed(7)
    query = torch.randn(b, hq, q, D, generator=gen)
    keys, values = torch.randn(b, hkv, k_len, D, generator=gen), torch.randn(b, hkv, k_len, D, generator=gen)
    valid = torch.arange(k_len)[None, :] >= torch.tensor([[0], [4]]) if padded else None
    got = dense_causal_attention(query, keys, values, valid, SCALE, sliding_window=sliding_window)
    expected = naive_dense(query, keys, values, valid, SCALE, sliding_window)
    assert got.shape == query.shape
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    if padded:
        # The padded sequence's real queries ignore the padding: same as the unpadded suffix alone.
        real = dense_causal_attention(
            query[1:, :, max(0, q - 8) :],
            keys[1:, :, 4:],
            values[1:, :, 4:],
            None,
            SCALE,
            sliding_window=sliding_window,
        )
        torch.testing.assert_close(got[1:, :, max(0, q - 8) :], real, atol=1e-5, rtol=1e-5)
