"""Paged decode attention on the CPU, from a small C++ kernel (csrc/paged_decode.cpp).

The torch path of a decode step gathers every head's blocks into a padded tensor,
casts it, builds a mask and runs SDPA: the cache is read and written several times
over, and the gather alone took half of a step at batch 16 x 2k. The kernel reads
each head's blocks in place, in their storage dtype, once (cpu_extension.py builds it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvsqueeze.ops.cpu_extension import require_cpu_extension
from kvsqueeze.store import PagedKV


def paged_decode_cpu(
    query: torch.Tensor,
    stores: Sequence[PagedKV],
    query_positions: Sequence[int] | torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    masked: bool = True,
) -> torch.Tensor:
    """One query token per store: query [stores, heads, group, d] (store i's kv-heads
    and their GQA groups) at query_positions[i], over each store's live entries; all
    stores share one CPU pool. masked=False promises every entry is older than its
    query and inside any window (a plain decode step). Returns query's shape and dtype;
    a head with no entries gets zeros."""
    ext = require_cpu_extension()
    pool = stores[0].pool
    return ext.paged_decode(
        query.contiguous(),
        pool.keys,
        pool.values,
        pool.positions,
        [kv.host_table for kv in stores],
        [kv.host_lengths for kv in stores],
        _int64(query_positions),
        float(scaling),
        sliding_window or 0,
        masked,
    )


def append_decode_cpu(
    stores: Sequence[PagedKV],
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: Sequence[int] | torch.Tensor,
    spare: Sequence[int] = (),
) -> torch.Tensor:
    """store/paged_kv.py's append_step in one C++ call (its `kernel`): every head of every
    store gets its entry keys/values[row] (rows store-major, in the pool's dtype) at
    positions[store], lengths grow in place. A head whose last block is full takes the
    next of the `spare` block ids (taken from the pool by the caller) into its table, in
    row order. Where the spare ids are too few, or a full head's table has no free
    column, nothing is written and the full heads' rows come back (int64)."""
    pool = stores[0].pool
    return require_cpu_extension().append_decode(
        pool.keys, pool.values, pool.positions,
        [kv.host_table for kv in stores], [kv.num_blocks for kv in stores],
        [kv.host_lengths for kv in stores], [kv.lengths for kv in stores],
        keys, values, _int64(positions), torch.tensor(spare, dtype=torch.int32),
    )  # fmt: skip


def blocks_needed_cpu(stores: Sequence[PagedKV], n_tokens: int) -> int:
    """Blocks the stores' heads must take to grow by n_tokens each (BlockManager.blocks_for)."""
    return require_cpu_extension().blocks_needed(
        [kv.host_lengths for kv in stores], [kv.num_blocks for kv in stores], n_tokens, stores[0].block_size
    )


def _int64(values: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Host int64 positions; a tensor as it is (list() of a tensor makes one tensor per element)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.int64).contiguous()
    return torch.tensor(list(values), dtype=torch.int64)
