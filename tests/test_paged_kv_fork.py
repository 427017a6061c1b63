"""Forked PagedKV stores share their blocks (the pool counts holders) and copy a block
before writing into it: appends and evictions on one holder never change what another
holder reads, and the pool is whole once every holder has left."""

from __future__ import annotations

import torch

from kvsqueeze.store import BlockPool, PagedKV
from kvsqueeze.store.paged_kv import append_step

D = 8


def _entries(kv: PagedKV) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return [tuple(t.clone() for t in run) for run in kv.runs()]


def _filled(pool: BlockPool, heads: int = 3, t: int = 37) -> PagedKV:
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(heads, t, D, generator=g), torch.randn(heads, t, D, generator=g)
    keep = torch.rand(heads, t, generator=g) < 0.7
    return PagedKV.from_dense(pool, keys, values, keep)


def test_a_fork_shares_every_block_and_the_pool_counts_holders():
    pool = BlockPool(64, D)
    kv = _filled(pool)
    used = pool.num_blocks - pool.num_free
    fork = kv.fork()
    assert pool.num_blocks - pool.num_free == used  # nothing copied
    assert fork.owned_blocks() == kv.owned_blocks()
    assert all(pool.is_shared(b) for b in kv.owned_blocks())
    for a, b in zip(_entries(kv), _entries(fork), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    kv.leave(slice(0, kv.num_heads))
    assert pool.num_blocks - pool.num_free == used  # the fork still holds them
    fork.leave(slice(0, fork.num_heads))
    assert pool.num_free == pool.num_blocks


def test_appends_after_unshare_tails_leave_the_other_holder_untouched():
    pool = BlockPool(64, D)
    kv = _filled(pool)
    before = _entries(kv)
    fork = kv.fork()
    partial = sum(1 for n in kv.lengths.tolist() if n % pool.block_size)
    assert fork.shared_tails() == partial > 0
    free = pool.num_free
    fork.unshare_tails()
    assert pool.num_free == free - partial and fork.shared_tails() == 0
    g = torch.Generator().manual_seed(1)
    for step in range(20):  # fills the copied tails and takes fresh blocks
        append_step([fork], torch.randn(3, D, generator=g), torch.randn(3, D, generator=g), [100 + step])
    fork.append(torch.randn(3, 5, D, generator=g), torch.randn(3, 5, D, generator=g), torch.arange(120, 125))
    after = _entries(kv)
    for a, b in zip(before, after, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for h, (k, _, p) in enumerate(_entries(fork)):
        n = len(before[h][0])
        assert torch.equal(k[:n], before[h][0]) and p[n:].tolist() == list(range(100, 125))


def test_eviction_copies_the_shared_blocks_it_writes():
    pool = BlockPool(64, D)
    kv = _filled(pool)
    before = _entries(kv)
    fork = kv.fork()
    keep = torch.zeros(3, int(kv.lengths.max()), dtype=torch.bool)
    keep[:, 1::2] = True  # every other entry: later entries move into earlier (shared) blocks
    fork.evict(keep)
    for a, b in zip(before, _entries(kv), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    for h, (k, v, p) in enumerate(_entries(fork)):
        assert torch.equal(k, before[h][0][1::2]) and torch.equal(v, before[h][1][1::2])
        assert torch.equal(p, before[h][2][1::2])
    kv.leave(slice(0, 3))
    fork.leave(slice(0, 3))
    assert pool.num_free == pool.num_blocks
