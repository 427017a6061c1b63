"""attend: attention over any KV store, the one entry point the compressed layer calls.

It picks the path for the store's layout: a PagedKV's blocks go to paged_attention,
a QuantizedKV's codes to quantized_attention (dequantized block by block, never the
whole cache at once), a FlatKV (or any other KVStore) to ragged_attention. Each takes its Triton kernel
for a decode step on CUDA and its torch reference otherwise.
"""

from __future__ import annotations

import torch

from kvsqueeze.ops.paged_attention import paged_attention
from kvsqueeze.ops.quantized_attention import quantized_attention
from kvsqueeze.ops.ragged_attention import ragged_attention
from kvsqueeze.store import KVStore, PagedKV
from kvsqueeze.store.quantized_kv import QuantizedKV


def attend(
    query: torch.Tensor,
    store: KVStore,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention of query [heads, group, q, head_dim] over the store's live
    entries: a query at query_positions[heads, q] sees the entries at positions <= its
    own (and fewer than `sliding_window` behind it, with a window); one that sees
    nothing gets zeros. GQA: the group's query heads share their kv-head's entries,
    which are never repeated. Returns [heads, group, q, head_dim]."""
    if isinstance(store, PagedKV):
        return paged_attention(query, store, query_positions, scaling, sliding_window)
    if isinstance(store, QuantizedKV):
        return quantized_attention(query, store, query_positions, scaling, sliding_window)
    return ragged_attention(query, store, query_positions, scaling, sliding_window)
