"""Paged decode attention in Triton: one query per head over a PagedKV's blocks, GQA
served from one read of K/V.

It is the split-K kernel of triton_decode.py with paged addressing: a head's entry i
is read from pool slot block_table[head, i // block_size] * block_size + i % block_size
rather than from a contiguous run, so a decode step reads the blocks where they lie
(no gather, no copy of the cache) and costs what the flat layout costs plus one
block-id load per key tile. Sharing the kernel keeps one online softmax, one chunking
rule and one set of tests for both layouts.
"""

from __future__ import annotations

import torch

from kvsqueeze.ops.triton_decode import ragged_decode
from kvsqueeze.store import PagedKV


def paged_decode_attention(
    query: torch.Tensor,
    kv: PagedKV,
    scaling: float,
    query_positions: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **launch: int,
) -> torch.Tensor:
    """ops.paged_attention with one query per head (query [heads, group, 1, d]). With
    query_positions [heads, 1] it masks by position (and sliding window); `launch`
    passes block_n, chunk_size, num_warps, num_stages through."""
    d = kv.head_dim
    pool = kv.pool
    positions = pool.positions.view(-1) if query_positions is not None else None
    return ragged_decode(
        query,
        pool.keys.view(-1, d),
        pool.values.view(-1, d),
        None,
        kv.lengths,
        scaling,
        positions,
        query_positions,
        sliding_window,
        block_table=kv.block_table,
        page_size=kv.block_size,
        **launch,
    )
