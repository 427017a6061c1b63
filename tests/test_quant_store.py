"""QuantizedKV: residual window boundaries, groups filling during decode, eviction on
quantized entries, and bytes counted from the tensors."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.store import FlatKV
from kvsqueeze.store.quantize import KVQuantizer
from kvsqueeze.store.quantized_kv import QuantizedKV

D, G, R = 16, 4, 8


def dense(heads: int, tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(heads, tokens, D, generator=gen).to(dtype), torch.randn(heads, tokens, D, generator=gen).to(
        dtype
    )


def by_hand(q: KVQuantizer, keys: torch.Tensor, values: torch.Tensor, n_quant: int):
    """One head's kept entries [n, D], the first n_quant quantized in groups of G: what
    the store must hold (quantize after eviction, done with quantize.py directly)."""
    old_k, old_v = keys[:n_quant], values[:n_quant]
    if q.keys_per_channel:
        codes, scale, zero = q.quantize_key_groups(old_k.reshape(-1, G, D))
        old_k = q.dequantize_keys(codes, scale[:, None], zero[:, None]).reshape(-1, D)
    else:
        old_k = q.dequantize_rows(q.quantize_rows(old_k), D)
    old_v = q.dequantize_rows(q.quantize_rows(old_v), D)
    return torch.cat([old_k, keys[n_quant:]]), torch.cat([old_v, values[n_quant:]])


@pytest.mark.parametrize("key_axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_prefill_quantizes_whole_groups_beyond_the_residual_window(bits, key_axis):
    # Heads keep R-1, R, R+1, R+G-1, R+G and 3G+R+2 entries: the window's boundaries.
    kept = [R - 1, R, R + 1, R + G - 1, R + G, 3 * G + R + 2]
    t = max(kept) + 5
    keys, values = dense(len(kept), t, seed=bits)
    gen = torch.Generator().manual_seed(1)
    keep = torch.zeros(len(kept), t, dtype=torch.bool)
    for h, n in enumerate(kept):
        keep[h, torch.randperm(t, generator=gen)[:n]] = True
    q = KVQuantizer(bits=bits, group=G, key_axis=key_axis)
    kv = QuantizedKV.from_dense(keys, values, keep, quantizer=q, residual_len=R)

    expected_quant = [0, 0, 0, 0, G, 3 * G]
    assert kv.codes.lengths.tolist() == expected_quant
    assert kv.residual.lengths.tolist() == [n - e for n, e in zip(kept, expected_quant, strict=True)]
    assert kv.lengths.tolist() == kept
    for h in range(len(kept)):
        k, v, p = kv.head(h)
        want_k, want_v = by_hand(q, keys[h][keep[h]], values[h][keep[h]], expected_quant[h])
        assert p.tolist() == keep[h].nonzero().flatten().tolist()
        assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_a_group_fills_during_decode_exactly_as_if_prefilled():
    """Appending token by token (heads out of phase, some steps skipping heads) ends in
    the very store a prefill of the same entries builds: groups cut at the same places."""
    heads, t = 3, 40
    keys, values = dense(heads, t, seed=3)
    q = KVQuantizer(bits=4, group=G)
    start = [R - 1, R + G - 1, 2]  # head 1 flushes on the first append, head 0 after G + 1
    keep = torch.arange(t)[None, :] < torch.tensor(start)[:, None]
    kv = QuantizedKV.from_dense(keys, values, keep, quantizer=q, residual_len=R)
    assert kv.codes.lengths.tolist() == [0, 0, 0]
    gen = torch.Generator().manual_seed(4)
    got = [list(range(n)) for n in start]
    nxt = list(start)
    for step in range(25):
        valid = torch.rand(heads, 1, generator=gen) > 0.2
        idx = torch.tensor(nxt)
        kv.append(
            keys[torch.arange(heads), idx][:, None], values[torch.arange(heads), idx][:, None], idx[:, None], valid
        )
        for h in range(heads):
            if valid[h, 0]:
                got[h].append(nxt[h])
                nxt[h] += 1
        if step == 0:
            assert kv.codes.lengths.tolist() == [0, G if valid[1, 0] else 0, 0]
        for h in range(heads):
            n = len(got[h])
            assert kv.residual.lengths[h] == (n if n < R + G else R + (n - R) % G)
    keep_all = torch.zeros(heads, t, dtype=torch.bool)
    for h in range(heads):
        keep_all[h, got[h]] = True
    prefilled = QuantizedKV.from_dense(keys, values, keep_all, quantizer=q, residual_len=R)
    assert kv.codes.lengths.tolist() == prefilled.codes.lengths.tolist()
    for h in range(heads):
        for a, b in zip(kv.head(h), prefilled.head(h), strict=True):
            assert torch.equal(a, b)


def test_a_chunk_longer_than_a_group_flushes_several_groups():
    keys, values = dense(2, 64, seed=5)
    q = KVQuantizer(bits=2, group=G)
    kv = QuantizedKV.from_dense(
        keys[:, :10], values[:, :10], torch.ones(2, 10, dtype=torch.bool), quantizer=q, residual_len=R
    )
    kv.append(keys[:, 10:], values[:, 10:], torch.arange(10, 64))
    whole = QuantizedKV.from_dense(keys, values, torch.ones(2, 64, dtype=torch.bool), quantizer=q, residual_len=R)
    assert kv.codes.lengths.tolist() == whole.codes.lengths.tolist() == [56, 56]
    for h in range(2):
        for a, b in zip(kv.head(h), whole.head(h), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("key_axis", ["channel", "token"])
def test_eviction_on_quantized_entries_keeps_their_codes(key_axis):
    """Evicting from a quantized store keeps exactly the chosen entries, dequantized as
    before (codes and group scales untouched); emptied groups are dropped; a group
    count that shrank carries on through later appends and evictions."""
    heads, t = 4, 60
    keys, values = dense(heads, t, seed=6)
    q = KVQuantizer(bits=4, group=G, key_axis=key_axis)
    kv = QuantizedKV.from_dense(
        keys[:, :50], values[:, :50], torch.ones(heads, 50, dtype=torch.bool), quantizer=q, residual_len=R
    )
    before = [kv.head(h) for h in range(heads)]
    gen = torch.Generator().manual_seed(7)
    keep = torch.rand(heads, 55, generator=gen) > 0.5
    keep[0, :G] = False  # head 0's first group goes entirely
    keep[1] = True
    bytes_before = kv.nbytes
    kv.evict(keep)
    assert kv.nbytes < bytes_before
    assert kv.lengths.tolist() == keep[:, :50].sum(dim=1).tolist()
    if q.keys_per_channel:
        assert kv.groups.lengths.tolist()[1] == 42 // G and kv.groups.lengths[0] < 42 // G
        assert kv.groups.positions.sum() == kv.codes.lengths.sum()
    for h in range(heads):
        k, v, p = kv.head(h)
        mask = keep[h, :50]
        assert torch.equal(k, before[h][0][mask]) and torch.equal(v, before[h][1][mask])
        assert torch.equal(p, before[h][2][mask])
    # Decoding on: appends still flush whole new groups after the shrunken ones.
    for i in range(50, 60):
        kv.append(keys[:, i : i + 1], values[:, i : i + 1], torch.tensor([i]))
    after = [kv.head(h) for h in range(heads)]
    kv.evict(torch.ones(heads, int(kv.lengths.max()), dtype=torch.bool))
    for h in range(heads):
        for a, b in zip(kv.head(h), after[h], strict=True):
            assert torch.equal(a, b)


def test_evict_needs_a_column_per_entry():
    keys, values = dense(2, 20)
    kv = QuantizedKV.from_dense(
        keys, values, torch.ones(2, 20, dtype=torch.bool), quantizer=KVQuantizer(), residual_len=R
    )
    with pytest.raises(ValueError, match="fewer than the longest"):
        kv.evict(torch.ones(2, 19, dtype=torch.bool))
    with pytest.raises(ValueError, match="residual window"):
        QuantizedKV.from_dense(
            keys, values, torch.ones(2, 20, dtype=torch.bool), quantizer=KVQuantizer(), residual_len=-1
        )


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_nbytes_is_codes_scales_zeros_positions_and_the_residual(bits):
    heads, t = 6, 200
    keys, values = dense(heads, t, dtype=torch.bfloat16)
    q = KVQuantizer(bits=bits, group=32)
    kv = QuantizedKV.from_dense(keys, values, torch.ones(heads, t, dtype=torch.bool), quantizer=q, residual_len=20)
    n_quant, n_res = 160, 40  # 200 - 20 rounded down to groups of 32
    per_quant = D * bits // 8 + (D * bits // 8 + 4)  # key codes, value codes + one fp16 scale and zero
    per_group = 2 * 2 * D + 4  # fp16 scale and zero per channel, the live count
    metadata = 3 * 3 * heads * 8  # lengths, capacity, starts (int64) of three FlatKVs
    want = heads * (n_quant * (per_quant + 4) + n_quant // 32 * per_group + n_res * (2 * 2 * D + 4)) + metadata
    assert kv.nbytes == want
    full = FlatKV.from_dense(keys, values, torch.ones(heads, t, dtype=torch.bool))
    assert kv.nbytes < full.nbytes * {8: 0.75, 4: 0.55, 2: 0.45}[bits]
    kv.reserve(64)
    grown, buffers = kv.nbytes, [part.keys.data_ptr() for part in (kv.codes, kv.groups)]
    for i in range(64):
        kv.append(keys[:, :1], values[:, :1], torch.tensor([t + i]))
    # The reservation held every append: the quantized parts were never regrown.
    assert [part.keys.data_ptr() for part in (kv.codes, kv.groups)] == buffers and kv.nbytes <= grown
    kv.trim()
    assert kv.lengths.tolist() == [t + 64] * heads and kv.nbytes < grown


def test_dequantized_is_a_flat_copy_of_the_same_entries():
    keys, values = dense(3, 30, seed=8)
    keep = torch.rand(3, 30, generator=torch.Generator().manual_seed(9)) > 0.3
    kv = QuantizedKV.from_dense(keys, values, keep, quantizer=KVQuantizer(bits=2, group=G), residual_len=R)
    flat = kv.dequantized()
    assert flat.lengths.tolist() == kv.lengths.tolist()
    for h in range(3):
        for a, b in zip(flat.head(h), kv.head(h), strict=True):
            assert torch.equal(a, b)
    assert kv.max_position() == flat.max_position()
