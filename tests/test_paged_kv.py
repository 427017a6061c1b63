"""PagedKV and its BlockPool: random sequences of join / append / evict / leave / reserve
against a plain per-head list of entries, then the pool is whole and attention over
the blocks equals attention over a FlatKV of the same entries and a dense masked
softmax."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsqueeze.ops import attend, paged_attention_reference, ragged_attention_reference
from kvsqueeze.store import BlockPool, FlatKV, PagedKV, PoolExhausted

Entry = tuple[torch.Tensor, torch.Tensor, int]  # key, value, position


class Model:
    """What one layer should hold: per head, its entries in order."""

    def __init__(self) -> None:
        self.heads: list[list[Entry]] = []

    def flat(self, head_dim: int) -> FlatKV:
        """A tight FlatKV of the same entries."""
        lengths = torch.tensor([len(entries) for entries in self.heads], dtype=torch.int64)
        entries = [e for head in self.heads for e in head]
        keys = torch.stack([e[0] for e in entries]) if entries else torch.zeros(0, head_dim)
        values = torch.stack([e[1] for e in entries]) if entries else torch.zeros(0, head_dim)
        positions = torch.tensor([e[2] for e in entries], dtype=torch.int32)
        return FlatKV(keys, values, positions, lengths, lengths.clone())


def dense_masked_attention(
    query: torch.Tensor, model: Model, query_positions: torch.Tensor, scaling: float, window: int | None
) -> torch.Tensor:
    """Per head and query, softmax over the visible entries, in float64 (zeros if none)."""
    h, g, q, d = query.shape
    out = torch.zeros(h, g, q, d, dtype=torch.float64)
    for head, entries in enumerate(model.heads):
        if not entries:
            continue
        keys = torch.stack([e[0] for e in entries]).double()
        values = torch.stack([e[1] for e in entries]).double()
        positions = torch.tensor([e[2] for e in entries])
        for j in range(q):
            qp = int(query_positions[head, j])
            seen = positions <= qp
            if window is not None:
                seen &= qp - positions < window
            if seen.any():
                weights = torch.softmax(query[head, :, j].double() @ keys[seen].T * scaling, dim=-1)
                out[head, :, j] = weights @ values[seen]
    return out


def check_pool_whole(pool: BlockPool, layers: list[PagedKV]) -> None:
    """Every block is free or owned by exactly one head of one layer; nothing else."""
    owned = [b for kv in layers for b in kv.owned_blocks()]
    free = pool._ids.free_ids()
    assert len(owned) == len(set(owned)), "a block owned twice"
    assert len(free) == len(set(free)), "a block free twice"
    assert not set(owned) & set(free), "a block both owned and free"
    assert sorted(owned + free) == list(range(pool.num_blocks)), "a block leaked"
    assert all(pool.is_out(b) for b in owned) and not any(pool.is_out(b) for b in free)


def check_layer(kv: PagedKV, model: Model) -> None:
    assert kv.lengths.tolist() == [len(entries) for entries in model.heads]
    assert bool((kv.num_blocks * kv.block_size >= kv.lengths).all())
    for h, entries in enumerate(model.heads):
        k, v, p = kv.head(h)
        assert p.tolist() == [e[2] for e in entries]
        if entries:
            assert torch.equal(k, torch.stack([e[0] for e in entries]))
            assert torch.equal(v, torch.stack([e[1] for e in entries]))
    blocks = int(kv.num_blocks.sum()) * kv.pool.block_nbytes
    assert blocks <= kv.nbytes <= blocks + 64 * max(kv.num_heads, 1) * 8


def check_attention(kv: PagedKV, model: Model, group: int, seed: int, q: int, window: int | None) -> None:
    gen = torch.Generator().manual_seed(seed)
    h, d = kv.num_heads, kv.head_dim
    query = torch.randn(h, group, q, d, generator=gen)
    newest = max((e[2] for entries in model.heads for e in entries), default=0)
    if q == 1:
        q_pos = torch.full((h, 1), newest + 1)
    else:  # queries inside the stored range: causality by position hides later entries
        q_pos = torch.randint(0, newest + 2, (h, q), generator=gen)
    scale = d**-0.5
    expected = dense_masked_attention(query, model, q_pos, scale, window)
    paged = paged_attention_reference(query, kv, q_pos, scale, window)
    flat = ragged_attention_reference(query, model.flat(d), q_pos, scale, window)
    torch.testing.assert_close(paged.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged, flat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(query, kv, q_pos, scale, window), paged)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_random_join_append_evict_leave_keep_pool_whole_and_attention_exact(data):
    head_dim = data.draw(st.sampled_from([4, 8]), "head_dim")
    kv_heads = data.draw(st.integers(1, 3), "kv_heads")
    group = data.draw(st.sampled_from([1, 3, 4]), "group")
    block_size = data.draw(st.sampled_from([4, 16]), "block_size")
    pool = BlockPool(400, head_dim, block_size=block_size)
    layers = [PagedKV(pool), PagedKV(pool)]  # two layers share the pool, as in the engine
    models = [Model(), Model()]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    clock = 0  # the next position: every append is newer than what is stored
    for _ in range(data.draw(st.integers(1, 12), "steps")):
        sequences = layers[0].num_heads // kv_heads
        op = data.draw(st.sampled_from(["join", "append", "evict", "leave", "reserve"] if sequences else ["join"]))
        for kv, model in zip(layers, models, strict=True):
            if op == "join":
                t = data.draw(st.integers(0, 40), "prompt")
                keys = torch.randn(kv_heads, t, head_dim, generator=gen)
                values = torch.randn(kv_heads, t, head_dim, generator=gen)
                keep = torch.rand(kv_heads, t, generator=gen) < data.draw(st.sampled_from([0.0, 0.3, 1.0]))
                positions = torch.arange(clock, clock + t)
                rows = kv.join(keys, values, keep, positions)
                assert rows == slice(len(model.heads), len(model.heads) + kv_heads)
                model.heads += [
                    [(keys[h, i], values[h, i], clock + i) for i in range(t) if keep[h, i]] for h in range(kv_heads)
                ]
            elif op == "append":
                q, h = data.draw(st.integers(1, 3), "q"), kv.num_heads
                keys, values = torch.randn(h, q, head_dim, generator=gen), torch.randn(h, q, head_dim, generator=gen)
                valid = torch.rand(h, q, generator=gen) < 0.7 if data.draw(st.booleans(), "masked") else None
                kv.append(keys, values, torch.arange(clock, clock + q), valid)
                for head in range(h):
                    model.heads[head] += [
                        (keys[head, i], values[head, i], clock + i) for i in range(q) if valid is None or valid[head, i]
                    ]
            elif op == "evict":
                width = max((len(e) for e in model.heads), default=0) + data.draw(st.integers(0, 3), "extra columns")
                keep = torch.rand(kv.num_heads, width, generator=gen) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))
                kv.evict(keep)
                model.heads = [
                    [e for i, e in enumerate(entries) if keep[h, i]] for h, entries in enumerate(model.heads)
                ]
                assert kv.num_blocks.tolist() == [math.ceil(len(e) / block_size) for e in model.heads], "freed"
            elif op == "leave":
                seq = data.draw(st.integers(0, sequences - 1), "leaving")
                kv.leave(slice(seq * kv_heads, (seq + 1) * kv_heads))
                del model.heads[seq * kv_heads : (seq + 1) * kv_heads]
            else:
                n = data.draw(st.integers(0, 20), "reserve")
                kv.reserve(n)
                assert bool((kv.num_blocks * block_size >= kv.lengths + n).all())
        clock += 50
        check_pool_whole(pool, layers)
        for kv, model in zip(layers, models, strict=True):
            check_layer(kv, model)
    for kv, model in zip(layers, models, strict=True):
        if kv.num_heads:
            check_attention(kv, model, group, seed=clock, q=data.draw(st.sampled_from([1, 2]), "queries"), window=None)
            check_attention(kv, model, group, seed=clock + 1, q=2, window=data.draw(st.integers(1, 60), "window"))
    for kv in layers:  # every sequence leaves: the pool is whole again
        kv.leave(slice(0, kv.num_heads))
    assert pool.num_free == pool.num_blocks
    check_pool_whole(pool, layers)


@pytest.mark.parametrize("group", [1, 3, 4])
def test_heads_around_a_block_boundary(group):
    """Heads of 0, 1, 15, 16, 17 entries (and 33), blocks of 16: attention over the
    paged store equals the flat store and the dense masked softmax."""
    lengths, d = [0, 1, 15, 16, 17, 33], 8
    gen = torch.Generator().manual_seed(group)
    keys, values = torch.randn(len(lengths), 40, d, generator=gen), torch.randn(len(lengths), 40, d, generator=gen)
    keep = torch.arange(40)[None, :] < torch.tensor(lengths)[:, None]
    pool = BlockPool(32, d)
    kv = PagedKV.from_dense(pool, keys, values, keep)
    assert kv.num_blocks.tolist() == [0, 1, 1, 1, 2, 3]
    model = Model()
    model.heads = [[(keys[h, i], values[h, i], i) for i in range(n)] for h, n in enumerate(lengths)]
    check_layer(kv, model)
    for q, window in ((1, None), (1, 8), (2, None), (2, 5)):
        check_attention(kv, model, group, seed=q, q=q, window=window)


def test_a_sequence_joins_and_leaves_without_moving_the_others():
    pool = BlockPool(16, 4, block_size=4)
    kv = PagedKV(pool)
    first = kv.join(torch.randn(2, 10, 4), torch.randn(2, 10, 4))
    second = kv.join(torch.randn(2, 6, 4), torch.randn(2, 6, 4))
    assert (first, second) == (slice(0, 2), slice(2, 4))
    blocks_of_second = kv.block_table[2:].clone()
    data_of_second = [tuple(x.clone() for x in kv.head(h)) for h in (2, 3)]
    free_before = pool.num_free
    kv.leave(first)
    assert pool.num_free == free_before + 6, "3 blocks per head of 10 entries went back"
    assert kv.num_heads == 2
    assert torch.equal(kv.block_table[:, : blocks_of_second.shape[1]], blocks_of_second), "nothing moved"
    for h in range(2):
        for a, b in zip(kv.head(h), data_of_second[h], strict=True):
            assert torch.equal(a, b)


def test_pool_refuses_double_release_and_overdraw():
    pool = BlockPool(4, 2)
    blocks = pool.allocate(3)
    assert pool.num_free == 1 and all(pool.is_out(b) for b in blocks)
    with pytest.raises(PoolExhausted, match="asked for 2"):
        pool.allocate(2)
    pool.release(blocks[:1])
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(blocks[:1])
    kv = PagedKV(pool)
    with pytest.raises(PoolExhausted):  # 3 heads of 16 need 3 blocks; only 2 are free
        kv.join(torch.randn(3, 16, 2), torch.randn(3, 16, 2))


def test_blocks_go_out_lowest_id_first_and_a_heads_run_ascends():
    """A head's blocks are taken in ascending memory order (the decode kernel streams
    them; descending runs read slower), and freed blocks are reused lowest first."""
    pool = BlockPool(32, 4)
    assert pool.allocate(3) == [0, 1, 2]
    kv = PagedKV.from_dense(pool, torch.randn(2, 40, 4), torch.randn(2, 40, 4), None)
    for h in range(2):
        run = kv.host_table[h, : kv.num_blocks[h]].tolist()
        assert run == sorted(run) and run == list(range(run[0], run[0] + len(run)))
    pool.release([2, 1])
    assert pool.allocate(2) == [1, 2]


def test_eviction_returns_blocks_and_nbytes_follows():
    pool = BlockPool(64, 8)
    kv = PagedKV.from_dense(pool, torch.randn(4, 128, 8), torch.randn(4, 128, 8), torch.ones(4, 128, dtype=torch.bool))
    assert pool.num_free == 64 - 32
    full = kv.nbytes
    keep = torch.zeros(4, 128, dtype=torch.bool)
    keep[:, -16:] = True  # keep the last block's worth per head
    kv.evict(keep)
    assert pool.num_free == 64 - 4
    assert kv.nbytes <= full / 8 + 4 * 8 * 8, "an eighth of the blocks, plus the table"
    assert kv.head(0)[2].tolist() == list(range(112, 128))


@pytest.mark.parametrize("t", [5, 16, 37])
def test_joining_every_entry_writes_what_an_all_true_keep_writes(t):
    """join(keep=None) copies whole blocks at once; it must store exactly what the
    entry-by-entry path stores, positions included, beside another sequence."""
    keys, values = torch.randn(3, t, 8), torch.randn(3, t, 8)
    positions = torch.arange(100, 100 + t)
    whole, masked = PagedKV(BlockPool(64, 8, block_size=16)), PagedKV(BlockPool(64, 8, block_size=16))
    for kv in (whole, masked):
        kv.join(torch.randn(2, 9, 8), torch.randn(2, 9, 8))  # someone already holds blocks
    whole.join(keys, values, None, positions)
    masked.join(keys, values, torch.ones(3, t, dtype=torch.bool), positions)
    for h in range(2, 5):
        for a, b in zip(whole.head(h), masked.head(h), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(whole.head(4)[2], positions.to(torch.int32))
