"""FlatKV: ragged per-head storage against a plain per-head list of kept entries."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.store import FlatKV


class DenseReference:
    """Per head: a list of (key, value, position), in the order entries were kept."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor):
        self.heads = [
            [(keys[h, t], values[h, t], int(positions[h, t])) for t in range(keys.shape[1]) if keep[h, t]]
            for h in range(keys.shape[0])
        ]

    def append(self, keys, values, positions, valid=None):
        for h in range(keys.shape[0]):
            for i in range(keys.shape[1]):
                if valid is None or valid[h, i]:
                    self.heads[h].append((keys[h, i], values[h, i], int(positions[h, i])))

    def check(self, kv: FlatKV) -> None:
        assert kv.num_heads == len(self.heads)
        assert kv.lengths.tolist() == [len(entries) for entries in self.heads]
        assert kv.num_tokens == sum(len(entries) for entries in self.heads)
        for h, entries in enumerate(self.heads):
            k, v, p = kv.head(h)
            assert p.tolist() == [e[2] for e in entries]
            if entries:
                assert torch.equal(k, torch.stack([e[0] for e in entries]))
                assert torch.equal(v, torch.stack([e[1] for e in entries]))
            else:
                assert k.shape == (0, kv.head_dim)
        check_layout(kv)


def check_layout(kv: FlatKV) -> None:
    """The slot bookkeeping agrees with itself: runs, free slots, heads of slots."""
    slots = kv.keys.shape[0]
    assert kv.values.shape == kv.keys.shape and kv.positions.shape == (slots,)
    assert int(kv.capacity.sum()) == slots
    assert bool((kv.capacity >= kv.lengths).all())
    assert torch.equal(kv.cu_seqlens, torch.cat([torch.zeros(1, dtype=kv.lengths.dtype), kv.lengths.cumsum(0)]))
    assert torch.equal(kv.starts, torch.cumsum(kv.capacity, 0) - kv.capacity), "runs tile the buffer in order"
    for h in range(kv.num_heads):
        start, length, cap = int(kv.starts[h]), int(kv.lengths[h]), int(kv.capacity[h])
        assert bool((kv.positions[start : start + length] >= 0).all())
        assert bool((kv.positions[start + length : start + cap] == -1).all()), "free slots are marked -1"


def random_dense(h: int, t: int, d: int, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(h, t, d, generator=gen).to(dtype)
    values = torch.randn(h, t, d, generator=gen).to(dtype)
    return keys, values, gen


def test_from_dense_keeps_selected_entries_in_order():
    keys, values, gen = random_dense(4, 20, 8)
    keep = torch.rand(4, 20, generator=gen) < 0.4
    keep[1] = True  # a head that keeps everything
    keep[2] = False  # and one that keeps nothing
    keep[3, :3] = True
    kv = FlatKV.from_dense(keys, values, keep)
    assert kv.positions.dtype == torch.int32
    assert torch.equal(kv.capacity, kv.lengths), "from_dense is tight"
    assert kv.keys.shape == (int(keep.sum()), 8)
    DenseReference(keys, values, keep, torch.arange(20).expand(4, 20)).check(kv)
    for h in range(4):
        assert kv.head(h)[2].tolist() == keep[h].nonzero().flatten().tolist()


def test_from_dense_with_positions_per_head():
    keys, values, gen = random_dense(3, 10, 4)
    keep = torch.rand(3, 10, generator=gen) < 0.6
    positions = torch.arange(10)[None, :] + torch.tensor([[0], [100], [1000]])
    kv = FlatKV.from_dense(keys, values, keep, positions)
    DenseReference(keys, values, keep, positions).check(kv)
    # A shared [tokens] position vector works too.
    kv1 = FlatKV.from_dense(keys, values, keep, torch.arange(5, 15))
    assert kv1.head(2)[2].tolist() == (keep[2].nonzero().flatten() + 5).tolist()


def test_append_one_token_per_step_matches_dense_and_amortizes_copies():
    h, t, d, steps = 4, 40, 8, 200
    keys, values, gen = random_dense(h, t, d)
    keep = torch.rand(h, t, generator=gen) < 0.5
    keep[:, -1] = True
    kv = FlatKV.from_dense(keys, values, keep)
    ref = DenseReference(keys, values, keep, torch.arange(t).expand(h, t))
    pointers, copies = kv.keys.data_ptr(), 0
    for step in range(steps):
        new_k, new_v = torch.randn(h, 1, d, generator=gen), torch.randn(h, 1, d, generator=gen)
        pos = torch.full((h, 1), t + step)
        kv.append(new_k, new_v, pos)
        ref.append(new_k, new_v, pos)
        if kv.keys.data_ptr() != pointers:
            copies, pointers = copies + 1, kv.keys.data_ptr()
        if step % 25 == 0:
            ref.check(kv)
    ref.check(kv)
    assert kv.lengths.tolist() == [int(keep[i].sum()) + steps for i in range(h)]
    assert 1 <= copies <= steps // 10, f"{copies} reallocations in {steps} steps: growth is not amortized"
    # The slack stays small: a store of ~220 tokens per head holds at most a few dozen free slots.
    assert int((kv.capacity - kv.lengths).max()) <= 32


def test_append_several_tokens_with_shared_positions():
    keys, values, gen = random_dense(3, 12, 4)
    keep = torch.rand(3, 12, generator=gen) < 0.5
    kv = FlatKV.from_dense(keys, values, keep)
    ref = DenseReference(keys, values, keep, torch.arange(12).expand(3, 12))
    for step in range(30):
        q = 1 + step % 5
        new_k, new_v = torch.randn(3, q, 4, generator=gen), torch.randn(3, q, 4, generator=gen)
        pos = torch.arange(q) + 100 * (step + 1)
        kv.append(new_k, new_v, pos)
        ref.append(new_k, new_v, pos.expand(3, q))
    ref.check(kv)


def test_append_with_valid_mask_skips_invalid_entries():
    keys, values, gen = random_dense(5, 16, 4)
    keep = torch.rand(5, 16, generator=gen) < 0.5
    kv = FlatKV.from_dense(keys, values, keep)
    ref = DenseReference(keys, values, keep, torch.arange(16).expand(5, 16))
    for step in range(40):
        q = 1 + step % 4
        new_k, new_v = torch.randn(5, q, 4, generator=gen), torch.randn(5, q, 4, generator=gen)
        pos = (16 + 4 * step + torch.arange(q)).expand(5, q)
        valid = torch.rand(5, q, generator=gen) < 0.6
        valid[4] = False  # one head never grows
        before = kv.lengths.clone()
        kv.append(new_k, new_v, pos, valid=valid)
        ref.append(new_k, new_v, pos, valid=valid)
        assert torch.equal(kv.lengths - before, valid.sum(dim=-1))
    ref.check(kv)
    assert int(kv.lengths[4]) == int(keep[4].sum())


def test_evict_keeps_exactly_the_marked_entries():
    keys, values, gen = random_dense(4, 30, 8)
    keep = torch.rand(4, 30, generator=gen) < 0.7
    kv = FlatKV.from_dense(keys, values, keep)
    ref = DenseReference(keys, values, keep, torch.arange(30).expand(4, 30))
    for step in range(5):
        new_k, new_v = torch.randn(4, 1, 8, generator=gen), torch.randn(4, 1, 8, generator=gen)
        pos = torch.full((4, 1), 30 + step)
        kv.append(new_k, new_v, pos)
        ref.append(new_k, new_v, pos)
    assert bool((kv.positions < 0).any()), "appends should have left free slots"

    # Mark columns past each head's end too: they must not come to life.
    marks = torch.rand(4, 60, generator=gen) < 0.5
    marks[1] = False  # head 1 loses everything
    marks[:, -20:] = True
    expected = [[e for i, e in enumerate(ref.heads[h]) if marks[h, i]] for h in range(4)]
    kv.evict(marks)
    ref.heads = expected
    ref.check(kv)
    assert torch.equal(kv.capacity, kv.lengths)
    assert kv.keys.shape[0] == kv.num_tokens
    assert bool((kv.positions >= 0).all())
    assert int(kv.lengths[1]) == 0

    # The store keeps working after compaction, the emptied head included.
    for step in range(20):
        new_k, new_v = torch.randn(4, 1, 8, generator=gen), torch.randn(4, 1, 8, generator=gen)
        pos = torch.full((4, 1), 100 + step)
        kv.append(new_k, new_v, pos)
        ref.append(new_k, new_v, pos)
    ref.check(kv)


def test_evict_all_true_drops_only_free_slots():
    keys, values, gen = random_dense(2, 10, 4)
    kv = FlatKV.from_dense(keys, values, torch.ones(2, 10, dtype=torch.bool))
    kv.append(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.tensor([[10], [10]]))
    assert kv.keys.shape[0] > 22
    before = [tuple(x.clone() for x in kv.head(h)) for h in range(2)]
    kv.evict(torch.ones(2, 11, dtype=torch.bool))
    assert kv.keys.shape[0] == 22 and kv.lengths.tolist() == [11, 11]
    for h in range(2):
        for a, b in zip(before[h], kv.head(h), strict=True):
            assert torch.equal(a, b)


def tensor_bytes(kv: FlatKV) -> int:
    return sum(x.numel() * x.element_size() for x in vars(kv).values() if isinstance(x, torch.Tensor))


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 128), (torch.bfloat16, 128), (torch.float32, 64)])
def test_nbytes_counts_its_tensors_and_tracks_kept_tokens(dtype, head_dim):
    keys, values, gen = random_dense(8, 512, head_dim, dtype=dtype)
    keep = torch.rand(8, 512, generator=gen) < 0.2
    kv = FlatKV.from_dense(keys, values, keep)
    assert kv.nbytes == tensor_bytes(kv)
    payload = int(keep.sum()) * 2 * head_dim * keys.element_size()
    assert payload <= kv.nbytes <= 1.03 * payload
    # Evicting half the entries halves the bytes.
    half = (torch.arange(512) % 2 == 0).expand(8, 512)
    kv.evict(half)
    assert kv.nbytes == tensor_bytes(kv)
    assert kv.nbytes <= 1.03 * kv.num_tokens * 2 * head_dim * keys.element_size()
    # Growing counts the free slots too.
    kv.append(keys[:, :1], values[:, :1], torch.full((8, 1), 600))
    assert kv.nbytes == tensor_bytes(kv)
    assert kv.nbytes >= kv.keys.shape[0] * 2 * head_dim * keys.element_size()


def test_batch_folded_into_heads_without_padding():
    b, hkv, t, d = 3, 2, 24, 4
    gen = torch.Generator().manual_seed(5)
    keys = torch.randn(b, hkv, t, d, generator=gen)
    values = torch.randn(b, hkv, t, d, generator=gen)
    n_valid = torch.tensor([24, 9, 15])
    valid = torch.arange(t)[None, :] >= (t - n_valid)[:, None]  # left padding
    keep = (torch.rand(b, hkv, t, generator=gen) < 0.5) & valid[:, None, :]
    keep[..., -1] = True
    kv = FlatKV.from_dense(keys.flatten(0, 1), values.flatten(0, 1), keep.flatten(0, 1))
    assert kv.num_heads == b * hkv
    assert kv.keys.shape[0] == int(keep.sum()), "no padding to the longest head"
    assert len(set(kv.lengths.tolist())) > 1
    for i in range(b):
        for h in range(hkv):
            k, v, p = kv.head(i * hkv + h)
            assert torch.equal(k, keys[i, h][keep[i, h]])
            assert torch.equal(v, values[i, h][keep[i, h]])
            assert p.tolist() == keep[i, h].nonzero().flatten().tolist()
    check_layout(kv)


def appends_and_copies(kv: FlatKV, steps: int) -> tuple[int, int]:
    """One-token appends to every head: (relayouts, entries copied by them)."""
    relayouts = copied = 0
    for step in range(steps):
        pointer, stored = kv.keys.data_ptr(), kv.num_tokens
        new = torch.zeros(kv.num_heads, 1, kv.head_dim)
        kv.append(new, new, torch.tensor([10_000 + step]))
        if kv.keys.data_ptr() != pointer:
            relayouts, copied = relayouts + 1, copied + stored
    return relayouts, copied


def test_growth_is_amortized_across_short_and_long_heads():
    """Ada-KV leaves heads of very different lengths: a short head running out of room
    must not relayout the layer every few steps (it did 31 times in 512 appends,
    copying 141k entries to store 5k)."""
    keys, values, _ = random_dense(2, 4000, 4)
    keep = torch.zeros(2, 4000, dtype=torch.bool)
    keep[0, :40], keep[1] = True, True
    kv = FlatKV.from_dense(keys, values, keep)
    relayouts, copied = appends_and_copies(kv, 512)
    assert kv.lengths.tolist() == [552, 4512]
    assert relayouts <= 6, f"{relayouts} relayouts in 512 appends"
    assert copied <= 5 * kv.num_tokens, f"{copied} entries copied to store {kv.num_tokens}"
    assert kv.keys.shape[0] - kv.num_tokens <= kv.num_tokens // 8, "slack stays a small fraction"


def test_reserve_after_prefill_makes_room_for_all_appends_at_once():
    keys, values, _ = random_dense(2, 4000, 4)
    keep = torch.zeros(2, 4000, dtype=torch.bool)
    keep[0, :40], keep[1] = True, True
    kv = FlatKV.from_dense(keys, values, keep)
    kv.reserve(512)
    assert kv.keys.shape[0] == 4040 + 2 * 512, "exactly the room asked for"
    assert appends_and_copies(kv, 512) == (0, 0)
    assert kv.keys.shape[0] == kv.num_tokens
    kv.reserve(0)  # nothing to do when the room is there
    assert appends_and_copies(kv, 1)[0] == 1


@pytest.mark.parametrize(("dtype", "limit"), [(torch.float32, 1.01), (torch.bfloat16, 1.016)])
def test_metadata_of_a_full_cache_is_small(dtype, limit):
    """Positions are int32 and a slot's head is not stored: at head_dim 64, metadata is
    4 bytes per token against 512 (fp32, 0.8%) or 256 (bf16, 1.6%) bytes of K/V."""
    keys, values, _ = random_dense(6, 1024, 64, dtype=dtype)
    kv = FlatKV.from_dense(keys, values, torch.ones(6, 1024, dtype=torch.bool))
    assert kv.nbytes <= limit * kv.logical_nbytes()
    per_slot = [x for x in vars(kv).values() if isinstance(x, torch.Tensor) and len(x) == kv.keys.shape[0]]
    assert sorted(x.dtype for x in per_slot if x.dim() == 1) == [torch.int32], "only positions, in int32"
