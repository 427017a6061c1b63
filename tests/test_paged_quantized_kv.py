"""PagedQuantizedKV and its pool on random tensors: the same codes and entries as the
flat QuantizedKV (KIVI, arXiv 2402.02750) through quantize, decode appends across
the residual boundaries and eviction; attention a few pages at a time equals
attention over the dequantized cache at fp32 tolerance; pages go back to the pool."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.ops.padded_attention import padded_attention
from kvsqueeze.ops.paged_quantized_attention import paged_quantized_attention
from kvsqueeze.store.paged_quantized_kv import PagedQuantizedKV
from kvsqueeze.store.quantize import KVQuantizer
from kvsqueeze.store.quantized_block_pool import QuantizedBlockPool
from kvsqueeze.store.quantized_kv import QuantizedKV

H, D, T, G, R = 3, 16, 50, 8, 4
PAGES = 400


def _pair(bits: int, seed: int = 0, keep_ratio: float = 0.6, dtype: torch.dtype = torch.float32):
    """A PagedQuantizedKV and a QuantizedKV holding the same kept entries of one prompt
    (the paged one joined in two chunks)."""
    g = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    keep = torch.rand(H, T, generator=g) < keep_ratio
    q = KVQuantizer(bits, G)
    pool = QuantizedBlockPool(PAGES, D, q, dtype)
    kv = PagedQuantizedKV(pool, residual_len=R)
    kv.join(keys[:, :30], values[:, :30], torch.arange(30))
    kv.append(keys[:, 30:], values[:, 30:], torch.arange(30, T))
    k, v, _, live = kv.padded()
    assert torch.equal(k[live].float(), keys.flatten(0, 1).to(dtype).float())  # full precision before quantize
    kv.quantize(keep)
    ref = QuantizedKV.from_dense(keys.to(dtype), values.to(dtype), keep, torch.arange(T), quantizer=q, residual_len=R)
    return kv, ref, g


def _same(kv: PagedQuantizedKV, ref: QuantizedKV) -> None:
    assert torch.equal(kv.lengths, ref.lengths)
    for h in range(H):
        for a, b in zip(kv.head(h), ref.head(h), strict=True):
            assert torch.equal(a.float(), b.float())


def _decode(kv: PagedQuantizedKV, ref: QuantizedKV, g: torch.Generator, start: int, n: int) -> None:
    for t in range(start, start + n):
        k, v = torch.randn(H, 1, D, generator=g), torch.randn(H, 1, D, generator=g)
        kv.append(k, v, torch.tensor([t]))
        ref.append(k, v, torch.tensor([t]))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_same_entries_as_quantized_kv_through_decode_and_eviction(bits):
    kv, ref, g = _pair(bits)
    _same(kv, ref)
    assert int(kv.fp_lengths.sum()) == 0 and len(kv.q_table[kv.q_table >= 0]) == int((-(-kv.lengths // G)).sum())
    # Residual boundaries: R + G - 1 decoded (no flush), R + G (one group flushes), then more.
    _decode(kv, ref, g, T, R + G - 1)
    _same(kv, ref)
    assert bool((kv.fp_lengths == R + G - 1).all())
    _decode(kv, ref, g, T + R + G - 1, 1)
    _same(kv, ref)
    assert bool((kv.fp_lengths == R).all())
    _decode(kv, ref, g, T + R + G, 2 * G + 3)
    _same(kv, ref)
    keep = torch.rand(H, int(kv.lengths.max()) + 2, generator=g) < 0.5
    kv.evict(keep)
    ref.evict(keep)
    _same(kv, ref)
    _decode(kv, ref, g, T + 3 * R + 3 * G, G + 1)  # appends after an eviction
    _same(kv, ref)
    kv.leave()
    assert kv.pool.num_free == PAGES


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("window", [None, 20])
def test_attention_equals_attention_over_the_dequantized_cache(bits, window):
    stores = []
    for seed in range(3):  # three sequences over one pool, decoded and evicted differently
        kv, ref, g = _pair(bits, seed, keep_ratio=0.3 + 0.2 * seed)
        if stores:
            kv = _rehome(kv, stores[0].pool)
        _decode(kv, ref, g, T, 5 + 9 * seed)
        if seed == 2:
            kv.evict(torch.rand(H, int(kv.lengths.max()), generator=g) < 0.7)
        stores.append(kv)
    group, d = 2, D
    g = torch.Generator().manual_seed(7)
    query = torch.randn(3 * H, group, 2, d, generator=g)
    q_pos = torch.tensor([[T + 20, T + 40]]).expand(3 * H, 2)
    out = paged_quantized_attention(query, stores, q_pos, 0.3, window, block=2 * G)
    padded = [kv.padded() for kv in stores]
    longest = max(p[0].shape[1] for p in padded)

    def cat(i: int) -> torch.Tensor:
        pad = [torch.nn.functional.pad(p[i], (0, 0, 0, longest - p[i].shape[1])) for p in padded]
        return torch.cat(pad) if pad[0].dim() == 3 else None

    keys, values = cat(0), cat(1)
    positions = torch.cat([torch.nn.functional.pad(p[2], (0, longest - p[2].shape[1])) for p in padded])
    live = torch.cat([torch.nn.functional.pad(p[3], (0, longest - p[3].shape[1])) for p in padded])
    expected = padded_attention(query, keys, values, positions, live, q_pos, 0.3, window)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _rehome(kv: PagedQuantizedKV, pool: QuantizedBlockPool) -> PagedQuantizedKV:
    """The same store's pages copied into another pool (so several stores share one)."""
    old = kv.pool
    moved = PagedQuantizedKV(pool, kv.residual_len)
    moved.quantized = kv.quantized
    for name in ("_fp_table", "_q_table"):
        table = getattr(kv, name)
        fresh = table.clone()
        owned = table >= 0
        pages = torch.tensor(pool.allocate(int(owned.sum())), dtype=torch.int64)
        pool.arena[pages] = old.arena[table[owned]]
        fresh[owned] = pages
        setattr(moved, name, fresh)
    for name in ("_fp_pages", "_fp_off", "_fp_len", "_q_count"):
        setattr(moved, name, getattr(kv, name).clone())
    moved._sync()
    kv.leave()
    return moved


def test_bf16_pages_round_trip_full_precision_entries():
    kv, ref, _ = _pair(4, dtype=torch.bfloat16)
    _same(kv, ref)
    assert kv.pool.arena.dtype == torch.uint8 and kv.nbytes < kv.logical_nbytes(torch.bfloat16)


def test_pool_refuses_double_release_and_exhaustion():
    from kvsqueeze.store import PoolExhausted

    pool = QuantizedBlockPool(4, D, KVQuantizer(4, G))
    pages = pool.allocate(3)
    with pytest.raises(PoolExhausted):
        pool.allocate(2)
    pool.release(pages)
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(pages[:1])
    assert pool.num_free == 4


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
def test_cpu_kernel_equals_the_torch_path(bits, dtype, window):
    from kvsqueeze.ops.cpu_quantized_decode import quantized_decode_cpu, quantized_kernel_available

    if not quantized_kernel_available():
        pytest.skip("the quantized decode kernel cannot be built here")
    stores = []
    for seed in range(3):
        kv, ref, g = _pair(bits, seed, keep_ratio=0.3 + 0.2 * seed, dtype=dtype)
        if stores:
            kv = _rehome(kv, stores[0].pool)
        _decode(kv, ref, g, T, 5 + 9 * seed)
        if seed == 2:
            kv.evict(torch.rand(H, int(kv.lengths.max()), generator=g) < 0.7)
        stores.append(kv)
    query = torch.randn(3 * H, 2, 1, D, generator=torch.Generator().manual_seed(3))
    q_pos = torch.full((3 * H, 1), T + 20)
    expected = paged_quantized_attention(query, stores, q_pos, 0.3, window)
    torch.testing.assert_close(quantized_decode_cpu(query, stores, q_pos, 0.3, window), expected, atol=1e-5, rtol=1e-5)
