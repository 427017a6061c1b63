"""Compaction of a FlatKV after eviction, in Triton: kept entries of every head moved
contiguously into a fresh buffer, keys, values and positions in one pass.

Why: eviction (after prefill, or every few steps when compressing during decoding)
rewrites the whole layer. Boolean indexing in torch does it as a sync, then a gather
and a scatter per tensor; here the destination of every kept slot is computed once
(a prefix count, which also sizes the new buffer: the one host sync left, as the
allocation needs it) and a single launch streams each source row to its place.

Layout of the result: head h keeps its kept entries in their old order at
[new_starts[h], new_starts[h] + kept[h]), followed by slack[h] free slots (position
-1) so that the next appends need no relayout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvsqueeze.ops._triton import launcher, next_pow2
from kvsqueeze.store import FlatKV


@triton.jit
def _compact_kernel(
    keys_ptr,
    values_ptr,
    pos_ptr,
    dest_ptr,
    out_k_ptr,
    out_v_ptr,
    out_pos_ptr,
    num_slots,
    stride_k,
    stride_v,
    stride_ok,
    stride_ov,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = offs_t < num_slots
    dest = tl.load(dest_ptr + offs_t, mask=in_range, other=-1)
    moved = dest >= 0
    offs_d = tl.arange(0, D_PAD)
    both = moved[:, None] & (offs_d[None, :] < HEAD_DIM)
    # Dropped rows are masked out of the loads too: eviction reads only what it keeps.
    k = tl.load(keys_ptr + offs_t[:, None] * stride_k + offs_d[None, :], mask=both)
    v = tl.load(values_ptr + offs_t[:, None] * stride_v + offs_d[None, :], mask=both)
    p = tl.load(pos_ptr + offs_t, mask=moved)
    tl.store(out_k_ptr + dest[:, None] * stride_ok + offs_d[None, :], k, mask=both)
    tl.store(out_v_ptr + dest[:, None] * stride_ov + offs_d[None, :], v, mask=both)
    tl.store(out_pos_ptr + dest, p, mask=moved)


def compaction_plan(
    kv: FlatKV, keep: torch.Tensor, slack: torch.Tensor | int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dest[slots], new lengths[heads], new capacity[heads]) for keeping the live
    entries with keep[slot] True: dest is the new slot of each kept entry, -1 elsewhere."""
    keep = keep & (kv.positions >= 0)
    kept = keep.to(torch.int64)
    lengths = torch.zeros_like(kv.lengths).index_add_(0, kv.slot_head, kept.to(kv.lengths.dtype))
    capacity = lengths + slack
    new_starts = torch.cumsum(capacity, 0) - capacity
    # Rank of each kept slot within its head: kept slots before it, minus those of earlier heads.
    before = torch.cumsum(kept, 0) - kept
    head_first = torch.nn.functional.pad(torch.cumsum(kept, 0), (1, 0))[kv.starts]
    dest = new_starts[kv.slot_head] + before - head_first[kv.slot_head]
    return torch.where(keep, dest, -1), lengths, capacity


def compact_triton(kv: FlatKV, keep: torch.Tensor, slack: torch.Tensor | int = 0) -> FlatKV:
    """A new FlatKV holding only kv's live entries with keep[slot] True, each head's
    kept entries contiguous and in order, with `slack` free slots after each head
    (an int, or [heads]). kv itself is left unchanged."""
    dest, lengths, capacity = compaction_plan(kv, keep, slack)
    total = int(capacity.sum())  # the one sync: the buffer's size
    d = kv.head_dim
    keys = kv.keys.new_empty((total, d))  # free slots are never read: positions mark them
    values = kv.values.new_empty((total, d))
    positions = kv.positions.new_full((total,), -1)
    slots = kv.keys.shape[0]
    if slots and total:
        d_pad = max(16, next_pow2(d))
        block_t = max(16, min(128, 8192 // d_pad))
        launcher(_compact_kernel, kv.keys.device)[(triton.cdiv(slots, block_t),)](
            kv.keys,
            kv.values,
            kv.positions,
            dest,
            keys,
            values,
            positions,
            slots,
            kv.keys.stride(0),
            kv.values.stride(0),
            keys.stride(0),
            values.stride(0),
            HEAD_DIM=d,
            D_PAD=d_pad,
            BLOCK_T=block_t,
            num_warps=4,
        )
    return FlatKV(keys, values, positions, lengths, capacity)
