"""The CPU paged decode kernel (ops/csrc/paged_decode.cpp) against the torch reference:
the padded gather + SDPA over the same stores (padded_attention), for every dtype
pair, head dims with and without the AVX2 path, empty heads, sliding windows,
entries newer than the query, and blocks scattered by eviction."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.ops import cpu_extension
from kvsqueeze.ops.cpu_extension import cpu_kernels_available
from kvsqueeze.ops.cpu_paged_decode import paged_decode_cpu
from kvsqueeze.ops.padded_attention import padded_attention
from kvsqueeze.store import BlockPool, PagedKV
from kvsqueeze.store.paged_kv import step_slots

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="the C++ kernels cannot be built here")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def reference(query: torch.Tensor, stores: list[PagedKV], positions: list[int], scaling: float, window: int | None):
    """padded_attention over every store's heads, gathered (what the engine ran before the kernel)."""
    r, hkv, g, d = query.shape
    pool = stores[0].pool
    slots, live = step_slots(stores)
    keys, values = pool.keys.view(-1, d)[slots].float(), pool.values.view(-1, d)[slots].float()
    kpos = pool.positions.view(-1)[slots]
    q_pos = torch.tensor(positions).repeat_interleave(hkv)[:, None]
    out = padded_attention(query.float().reshape(r * hkv, g, 1, d), keys, values, kpos, live, q_pos, scaling, window)
    return out.view(r, hkv, g, d)


def make_stores(pool: BlockPool, lengths: list[int], heads: int, seed: int) -> list[PagedKV]:
    """Stores of `heads` kv heads, each keeping a random ~60% of `length` entries."""
    gen = torch.Generator().manual_seed(seed)
    stores = []
    for n in lengths:
        k = torch.randn(heads, n, pool.head_dim, generator=gen)
        v = torch.randn(heads, n, pool.head_dim, generator=gen)
        keep = torch.rand(heads, n, generator=gen) < 0.6
        stores.append(PagedKV.from_dense(pool, k, v, keep))
    return stores


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 24])
def test_kernel_matches_the_padded_reference(kv_dtype, q_dtype, head_dim):
    pool = BlockPool(512, head_dim, dtype=kv_dtype)
    stores = make_stores(pool, [5, 40, 77, 130], heads=2, seed=head_dim)
    query = torch.randn(4, 2, 3, head_dim).to(q_dtype)
    positions = [500] * 4
    out = paged_decode_cpu(query, stores, positions, 0.3, None, masked=False)
    assert out.dtype == q_dtype and out.shape == query.shape
    tol = max(TOL[kv_dtype], TOL[q_dtype])  # the output is rounded to the query's dtype
    torch.testing.assert_close(out.float(), reference(query, stores, positions, 0.3, None), atol=tol, rtol=0)


@pytest.mark.parametrize("window", [None, 7, 30])
def test_positions_after_the_query_and_outside_the_window_are_masked(window):
    pool = BlockPool(256, 64, dtype=torch.bfloat16)
    stores = make_stores(pool, [60, 90], heads=3, seed=1)
    query = torch.randn(2, 3, 2, 64)
    positions = [40, 70]  # each store holds entries after its query too
    out = paged_decode_cpu(query, stores, positions, 0.125, window, masked=True)
    torch.testing.assert_close(out, reference(query, stores, positions, 0.125, window), atol=2e-2, rtol=0)


def test_a_query_that_sees_nothing_gets_zeros():
    pool = BlockPool(64, 64, dtype=torch.bfloat16)
    empty = PagedKV.from_dense(pool, torch.randn(2, 4, 64), torch.randn(2, 4, 64), torch.zeros(2, 4, dtype=torch.bool))
    later = PagedKV.from_dense(pool, torch.randn(2, 20, 64), torch.randn(2, 20, 64), None, torch.arange(100, 120))
    out = paged_decode_cpu(torch.randn(2, 2, 3, 64), [empty, later], [50, 50], 0.125, None, masked=True)
    assert torch.equal(out, torch.zeros_like(out))


def test_scattered_blocks_after_eviction_and_appends():
    """Eviction packs heads into their leading blocks and frees the rest; later heads
    take freed blocks out of order: the kernel follows each head's own table."""
    pool = BlockPool(400, 64, dtype=torch.bfloat16)
    stores = make_stores(pool, [300, 200, 250], heads=3, seed=2)
    gen = torch.Generator().manual_seed(3)
    for kv in stores[:2]:
        kv.evict(torch.rand(kv.num_heads, int(kv.lengths.max()), generator=gen) < 0.3)
    stores += make_stores(pool, [180], heads=3, seed=4)
    for kv in stores:
        kv.append(torch.randn(3, 5, 64), torch.randn(3, 5, 64), torch.arange(400, 405))
    query = torch.randn(4, 3, 3, 64)
    out = paged_decode_cpu(query, stores, [405] * 4, 0.125, None, masked=False)
    torch.testing.assert_close(out, reference(query, stores, [405] * 4, 0.125, None), atol=2e-2, rtol=0)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CPU_KERNEL", "0")
    cpu_extension.cpu_extension.cache_clear()
    try:
        assert not cpu_kernels_available()
        with pytest.raises(RuntimeError, match="not available"):
            paged_decode_cpu(torch.zeros(1, 1, 1, 64), [], [0], 1.0)
    finally:
        monkeypatch.delenv("KVSQUEEZE_CPU_KERNEL")
        cpu_extension.cpu_extension.cache_clear()
    assert cpu_kernels_available()


def _state(stores: list[PagedKV]) -> list:
    pool = stores[0].pool
    out = []
    for kv in stores:
        slots, live = kv.live_slots()
        d = pool.head_dim
        out += [kv.host_lengths.clone(), kv.lengths.clone(), kv.num_blocks.clone()]
        out += [pool.keys.view(-1, d)[slots][live], pool.values.view(-1, d)[slots][live]]
        out += [pool.positions.view(-1)[slots][live]]
    return out


def test_append_decode_writes_what_the_torch_append_writes_across_block_boundaries():
    from kvsqueeze.ops.cpu_paged_decode import append_decode_cpu, blocks_needed_cpu
    from kvsqueeze.store.paged_kv import append_step

    worlds = []
    for kernel in (None, append_decode_cpu):
        pool = BlockPool(600, 64, dtype=torch.bfloat16)
        # lengths around block boundaries; make_stores evicts, which can leave the host and
        # device lengths as one tensor on the CPU: the kernel must count each entry once
        stores = make_stores(pool, [30, 64, 5, 200, 16], heads=3, seed=5)
        gen = torch.Generator().manual_seed(1)
        for step in range(40):
            new = len(stores) * 3
            if kernel is not None:  # the count the scheduler asks before each step
                lengths = torch.cat([kv.host_lengths for kv in stores])
                owned = torch.cat([kv.num_blocks for kv in stores])
                assert blocks_needed_cpu(stores, 1) == int(((lengths + 16) // 16 - owned).clamp_min(0).sum())
            k, v = torch.randn(new, 64, generator=gen), torch.randn(new, 64, generator=gen)
            append_step(stores, k, v, [300 + step + i for i in range(len(stores))], kernel)
        worlds.append(_state(stores))
    for torch_side, kernel_side in zip(*worlds, strict=True):
        assert torch.equal(torch_side, kernel_side)


@pytest.mark.parametrize("narrow", [False, True])
def test_full_heads_take_the_spare_blocks_in_the_kernel_or_widen_their_table_first(narrow, monkeypatch):
    """Every head at a block boundary: with room in the tables the kernel hands out the
    blocks itself (the Python fallback never runs); a table with no free column is
    widened the general way. Either way the pool gives the same blocks, in row order,
    and the contents equal the torch append's."""
    from kvsqueeze.ops.cpu_paged_decode import append_decode_cpu
    from kvsqueeze.store import paged_kv

    worlds = []
    for kernel in (None, append_decode_cpu):
        pool = BlockPool(64, 64, dtype=torch.bfloat16)
        gen = torch.Generator().manual_seed(0)
        dense = [(torch.randn(2, 32, 64, generator=gen), torch.randn(2, 32, 64, generator=gen)) for _ in range(3)]
        stores = [PagedKV.from_dense(pool, k, v, None) for k, v in dense]
        for kv in stores:
            width = 2 if narrow else 4  # heads own 2 blocks each; 2 columns: no free one
            kv._table = torch.cat([kv._table[:, :2], kv._table.new_full((2, width - 2), -1)], dim=1).contiguous()
        if kernel is not None and not narrow:
            monkeypatch.setattr(paged_kv, "_take_one_block_each", lambda *a: pytest.fail("the Python fallback ran"))
        new = torch.randn(6, 64, generator=gen), torch.randn(6, 64, generator=gen)
        paged_kv.append_step(stores, *new, [40, 41, 42], kernel)
        monkeypatch.undo()
        assert [kv.num_blocks.tolist() for kv in stores] == [[3, 3]] * 3
        assert all(kv.host_table.shape[1] >= 3 for kv in stores)
        worlds.append(_state(stores) + [kv.host_table[:, :3] for kv in stores])
    for torch_side, kernel_side in zip(*worlds, strict=True):
        assert torch.equal(torch_side, kernel_side)


def test_the_build_is_named_after_this_cpu():
    """-march=native builds must not be shared by machines of different CPUs."""
    tag = cpu_extension._machine_tag()
    assert len(tag) == 10 and tag == cpu_extension._machine_tag()
    assert cpu_extension.cpu_extension().__name__ == f"kvsqueeze_cpu_{tag}"
