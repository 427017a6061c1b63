"""Attention over ragged per-head KV: the torch reference, and the FlatKV dispatcher.

The reference runs anywhere, over any KVStore, and is the oracle for the GPU kernels.
Every (sequence, kv-head) is one run of keys; its GQA group of query heads attends to
that run as one sequence of group x queries rows, so K/V are never repeated and
nothing is padded. For FlatKV the runs are views into the store: no copy of the cache
is made.

On CUDA, a decode step (one query per head) over a FlatKV goes to the Triton kernel in
triton_decode.py when triton is installed, and a multi-token chunk to one batched SDPA
over a padded gather (padded_attention.py); everything else takes the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.ops._triton import use_triton
from kvsqueeze.ops.padded_attention import padded_attention, visible
from kvsqueeze.store import FlatKV, KVStore


def ragged_attention(
    query: torch.Tensor,
    kv: KVStore,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of query[heads, group, q, head_dim] over kv's live entries.

    query_positions[heads, q] are the queries' positions in the same numbering as the
    store's positions; a query sees the entries at positions <= its own (and, with a
    sliding window, fewer than `sliding_window` behind it). A query that sees no
    entry gets zeros. Returns [heads, group, q, head_dim].
    """
    if isinstance(kv, FlatKV) and query.shape[2] == 1 and use_triton(query, kv.keys) and query.dtype == kv.dtype:
        from kvsqueeze.ops.triton_decode import ragged_decode_attention

        return ragged_decode_attention(query, kv, scaling, query_positions, sliding_window)
    if isinstance(kv, FlatKV) and query.is_cuda:
        # A multi-token chunk (a question, a continued prompt): one batched call over a
        # padded gather, not a launch and a host sync per head.
        keys, values, positions, live = kv.padded()
        return padded_attention(query, keys, values, positions, live, query_positions, scaling, sliding_window)
    return ragged_attention_reference(query, kv, query_positions, scaling, sliding_window)


def needs_mask(kv: KVStore, query_positions: torch.Tensor, sliding_window: int | None) -> bool:
    """False for the usual decode step (one query per head, newer than every entry, no
    window): then attention needs no mask at all."""
    return sliding_window is not None or query_positions.shape[-1] > 1 or kv.max_position() > int(query_positions.min())


def ragged_attention_reference(
    query: torch.Tensor,
    kv: KVStore,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """ragged_attention in plain torch on any device: one SDPA per head, over the
    store's runs. The oracle for the kernels."""
    h, g, q, d = query.shape
    out = query.new_zeros(query.shape)
    masked = needs_mask(kv, query_positions, sliding_window)
    for head, (keys, values, positions) in enumerate(kv.runs()):
        if len(positions) == 0:
            continue
        rows = query[head].reshape(1, g * q, d)
        mask = None
        if masked:
            mask = visible(positions, query_positions[head], sliding_window).repeat(g, 1)[None]
            if not bool(mask.any(dim=-1).all()):
                # Rows that see nothing would give NaN; attend them to everything, then zero them.
                blind = ~mask.any(dim=-1, keepdim=True)
                res = F.scaled_dot_product_attention(
                    rows, keys[None], values[None], attn_mask=mask | blind, scale=scaling
                )
                out[head] = res.masked_fill(blind, 0.0).view(g, q, d)
                continue
        res = F.scaled_dot_product_attention(rows, keys[None], values[None], attn_mask=mask, scale=scaling)
        out[head] = res.view(g, q, d)
    return out
