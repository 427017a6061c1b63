"""Attention over ragged per-head KV (FlatKV): the torch reference.

It runs anywhere and is the oracle for the GPU kernels. Every (sequence, kv-head) is
one run of keys; its GQA group of query heads attends to that run as one sequence
of group x queries rows, so K/V are never repeated and nothing is padded. The runs
are views into the store: no copy of the cache is made.

On CUDA, a decode step (one query per head) goes to the Triton kernel in
triton_decode.py when triton is installed; everything else takes this reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.ops._triton import use_triton
from kvsqueeze.store import FlatKV


def ragged_attention(
    query: torch.Tensor,
    kv: FlatKV,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of query[heads, group, q, head_dim] over kv's live entries.

    query_positions[heads, q] are the queries' positions in the same numbering as
    kv.positions; a query sees the entries at positions <= its own (and, with a
    sliding window, fewer than `sliding_window` behind it). A query that sees no
    entry gets zeros. Returns [heads, group, q, head_dim].
    """
    if query.shape[2] == 1 and use_triton(query, kv.keys) and query.dtype == kv.keys.dtype:
        from kvsqueeze.ops.triton_decode import ragged_decode_attention

        return ragged_decode_attention(query, kv, scaling, query_positions, sliding_window)
    return ragged_attention_reference(query, kv, query_positions, scaling, sliding_window)


def ragged_attention_reference(
    query: torch.Tensor,
    kv: FlatKV,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """ragged_attention in plain torch on any device: the oracle for the kernels."""
    h, g, q, d = query.shape
    out = query.new_zeros(query.shape)
    # The usual decode step (one query, newer than every entry) needs no mask at all.
    masked = sliding_window is not None or q > 1 or bool(kv.positions.max() > query_positions.min())
    for head, (start, length) in enumerate(zip(kv.starts.tolist(), kv.lengths.tolist(), strict=True)):
        if length == 0:
            continue
        span = slice(start, start + length)
        rows = query[head].reshape(1, g * q, d)
        mask = None
        if masked:
            pos, q_pos = kv.positions[span].long(), query_positions[head].long()
            allowed = pos[None, :] <= q_pos[:, None]
            if sliding_window is not None:
                allowed &= q_pos[:, None] - pos[None, :] < sliding_window
            mask = allowed.repeat(g, 1)[None]
            if not bool(mask.any(dim=-1).all()):
                # Rows that see nothing would give NaN; attend them to everything, then zero them.
                blind = ~mask.any(dim=-1, keepdim=True)
                res = F.scaled_dot_product_attention(
                    rows, kv.keys[span][None], kv.values[span][None], attn_mask=mask | blind, scale=scaling
                )
                out[head] = res.masked_fill(blind, 0.0).view(g, q, d)
                continue
        res = F.scaled_dot_product_attention(
            rows, kv.keys[span][None], kv.values[span][None], attn_mask=mask, scale=scaling
        )
        out[head] = res.view(g, q, d)
    return out
