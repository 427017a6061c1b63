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
import torch.nn.functional as F

from kvsqueeze.ops._triton import use_triton
from kvsqueeze.ops.ragged_attention import visible
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
    h, g, q, d = query.shape
    keys, values, positions, live = kv.padded()
    if keys.shape[1] == 0:
        return query.new_zeros(query.shape)
    masked = sliding_window is not None or q > 1 or int(positions[live].max()) > int(query_positions.min())
    mask = live[:, None, :]  # [heads, 1, L]: the padding
    if masked:
        mask = (mask & visible(positions, query_positions, sliding_window)).repeat(1, g, 1)  # rows (group, q)
    # Rows that see nothing (an empty head, or everything after the query) would give NaN:
    # let them see everything, then zero them.
    blind = ~mask.any(dim=-1, keepdim=True)
    attn_mask = None if bool(live.all()) and not masked else (mask | blind)[:, None]
    out = F.scaled_dot_product_attention(
        query.reshape(h, 1, g * q, d), keys[:, None], values[:, None], attn_mask=attn_mask, scale=scaling
    )
    return out.masked_fill(blind[:, None], 0.0).view(h, g, q, d)
