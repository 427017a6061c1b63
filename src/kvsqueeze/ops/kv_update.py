"""Appending to and evicting from a store: one Triton launch each for a FlatKV on
CUDA, the store's own torch methods elsewhere.

The store owns its layout arithmetic (where the next entry of a head goes, which
slots survive an eviction); the kernels only move the data. The store cannot call
them itself, as store/ never imports ops/: the compressed layer calls these.
"""

from __future__ import annotations

import torch

from kvsqueeze.ops._triton import use_triton
from kvsqueeze.store import FlatKV, KVStore


def append_tokens(
    kv: KVStore,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> None:
    """kv.append: write keys/values[heads, q, d] with positions ([heads, q], [q] or
    0-d) after each head's live run, in place; entries with valid[heads, q] False are
    skipped. A FlatKV on CUDA takes the fused Triton append (no host sync)."""
    if not (isinstance(kv, FlatKV) and use_triton(kv.keys, keys)):
        kv.append(keys, values, positions, valid)
        return
    from kvsqueeze.ops.triton_append import append_tokens_triton

    kv.make_room(keys.shape[1], valid)
    append_tokens_triton(kv.keys, kv.values, kv.positions, kv.starts, kv.lengths, keys, values, positions, valid)


def evict(kv: KVStore, keep: torch.Tensor) -> None:
    """kv.evict: keep only entries keep[head, i] of each head's live run ([heads, >=
    longest]). A FlatKV on CUDA moves the kept rows with one Triton launch."""
    if isinstance(kv, FlatKV) and use_triton(kv.keys, keep):
        from kvsqueeze.ops.triton_compact import gather_rows_triton

        kv.evict(keep, gather_rows_triton)
        return
    kv.evict(keep)


def keep_from_indices(kv: KVStore, indices: torch.Tensor) -> torch.Tensor:
    """keep[heads, longest] for evict() from per-head kept indices [heads, k] into each
    head's live run (entries < 0 or past the head's length are padding)."""
    longest = int(kv.lengths.max()) if kv.num_heads else 0
    valid = (indices >= 0) & (indices < kv.lengths[:, None])
    keep = torch.zeros(kv.num_heads, longest + 1, dtype=torch.bool, device=indices.device)  # +1: padding lands here
    keep.scatter_(1, torch.where(valid, indices, longest), True)
    return keep[:, :longest]
