"""Attention over a PagedKV: the torch reference (the CPU path and the oracle), and the
dispatcher that takes the Triton kernel (triton_paged_decode.py) for decode on CUDA.

The reference gathers every head's blocks into one [heads, longest, d] tensor (the
store's padded() view) and runs a single batched SDPA over it, the GQA group of a
head as rows of its query: one launch per layer instead of one per head, which on CPU
beats looping over heads once a batch has more than a few heads (see
benchmarks/paged_decode.py). Heads shorter than the longest are masked.
"""

from __future__ import annotations

import torch

from kvsqueeze.ops._triton import use_triton
from kvsqueeze.ops.padded_attention import padded_attention
from kvsqueeze.ops.ragged_attention import needs_mask
from kvsqueeze.store import PagedKV


def paged_attention(
    query: torch.Tensor,
    kv: PagedKV,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """ops.ragged_attention's contract over a PagedKV: query [heads, group, q, d],
    query_positions [heads, q]; returns [heads, group, q, d]."""
    if query.shape[2] == 1 and use_triton(query, kv.pool.keys) and query.dtype == kv.dtype:
        from kvsqueeze.ops.triton_paged_decode import paged_decode_attention

        return paged_decode_attention(query, kv, scaling, query_positions, sliding_window)
    return paged_attention_reference(query, kv, query_positions, scaling, sliding_window)


def paged_attention_reference(
    query: torch.Tensor,
    kv: PagedKV,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """paged_attention in plain torch on any device: one SDPA over the padded gather."""
    keys, values, positions, live = kv.padded()
    masked = needs_mask(kv, query_positions, sliding_window)
    return padded_attention(query, keys, values, positions, live, query_positions, scaling, sliding_window, masked)
