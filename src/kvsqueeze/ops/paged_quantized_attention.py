"""Attention over many PagedQuantizedKV stores at once, a few pages at a time.

KIVI (arXiv 2402.02750) saves memory only if attention never rebuilds the cache in
full precision. The engine's heads of every decoding sequence are stacked as rows;
`PagedRows.blocks` walks their page tables a few columns at a time: a column of
quantized pages is one key group per row, gathered from the arena and dequantized
(store/quantize.py's arithmetic), then the full-precision residual's pages. The
online softmax of ops/quantized_attention.py (the flash-attention recurrence, fp32)
consumes the blocks, so at most `block` entries per row are ever in full precision.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from kvsqueeze.ops.quantized_attention import quantized_attention_reference
from kvsqueeze.store.paged_quantized_kv import PagedQuantizedKV

# Entries per block and row: a [rows, block, head_dim] fp32 tile of keys and one of values.
BLOCK = 512


class PagedRows:
    """The heads of several stores over one QuantizedBlockPool, stacked as rows (store
    i's heads after store i - 1's), with the blocks() iterator attention consumes."""

    def __init__(self, stores: Sequence[PagedQuantizedKV]) -> None:
        self.pool = stores[0].pool

        def stacked(tables: list[torch.Tensor], fill: int) -> torch.Tensor:
            width = max(t.shape[1] for t in tables)
            return torch.cat([F.pad(t, (0, width - t.shape[1]), value=fill) for t in tables])

        self.q_table = stacked([kv.q_table for kv in stores], -1)
        self.q_counts = stacked([kv.q_counts for kv in stores], 0)
        self.fp_table = stacked([kv.fp_table for kv in stores], -1)
        self.fp_offsets = torch.cat([kv.fp_offsets for kv in stores])
        self.fp_lengths = torch.cat([kv.fp_lengths for kv in stores])

    def blocks(
        self, block: int = BLOCK, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(keys [rows, b, d], values, positions [rows, b], live [rows, b]) about `block`
        entries per row at a time: the quantized pages dequantized, then the residual."""
        pool, device = self.pool, self.pool.device
        q, g, d = pool.quantizer, pool.group, pool.head_dim
        rows = self.q_table.shape[0]
        step = max(1, block // g)
        slot = torch.arange(g)
        for start in range(0, self.q_table.shape[1], step):
            pages = self.q_table[:, start : start + step]
            codes, value_rows, positions, scale, zero = pool.read_quantized(pages)
            keys = q.dequantize_keys(codes, scale[:, :, None], zero[:, :, None], dtype)
            values = q.dequantize_rows(value_rows, d, dtype)
            live = (slot[None, None, :] < self.q_counts[:, start : start + step, None]).reshape(rows, -1).to(device)
            yield keys.flatten(1, 2), _zeroed(values.flatten(1, 2), live), positions.flatten(1, 2), live
        size = pool.block_size
        step = max(1, block // size)
        first, end = self.fp_offsets[:, None], (self.fp_offsets + self.fp_lengths)[:, None]
        for start in range(0, self.fp_table.shape[1], step):
            pages = self.fp_table[:, start : start + step]
            keys, values, positions = pool.read_full(pages)
            index = torch.arange(start * size, (start + pages.shape[1]) * size)[None, :]
            live = ((index >= first) & (index < end)).to(device)
            values = _zeroed(values.flatten(1, 2).to(dtype), live)
            yield keys.flatten(1, 2).to(dtype), values, positions.flatten(1, 2), live


def _zeroed(values: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Values with the padding slots zeroed: a slot no row sees gets weight 0, and 0
    times whatever bytes an unused slot holds (NaN included) must stay 0."""
    return values.masked_fill(~live[..., None], 0.0)


def paged_quantized_attention(
    query: torch.Tensor,
    stores: Sequence[PagedQuantizedKV],
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """Attention of query [rows, group, q, d] (rows: the stores' kv-heads, stacked) at
    query_positions [rows, q] over every entry the stores hold, read a few pages at a
    time; a query sees entries at positions <= its own (and inside the sliding
    window). Returns [rows, group, q, d] in the query's dtype."""
    # quantized_attention_reference reads its store only through blocks(block, dtype).
    return quantized_attention_reference(query, PagedRows(stores), query_positions, scaling, sliding_window, block)  # type: ignore[arg-type]
