"""Appending to and compacting a FlatKV: one Triton launch each on CUDA, torch elsewhere.

Off CUDA these are FlatKV's own append and compact (the references). FlatKV keeps
its capacity bookkeeping on the host: the GPU append asks it for room first
(FlatKV.reserve), then writes in place. The store cannot call the kernels itself,
as store/ never imports ops/.
"""

from __future__ import annotations

import torch

from kvsqueeze.ops._triton import use_triton
from kvsqueeze.store import FlatKV


def append_tokens(
    kv: FlatKV,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> None:
    """FlatKV.append: write keys/values[heads, q, d] with positions ([heads, q], [q]
    or 0-d) after each head's live run and advance kv.lengths, in place; entries with
    valid[heads, q] False are skipped."""
    if not use_triton(kv.keys, keys):
        kv.append(keys, values, positions, valid)
        return
    from kvsqueeze.ops.triton_append import append_tokens_triton

    h, q, _ = keys.shape
    added = torch.full((h,), q, device=keys.device, dtype=kv.lengths.dtype) if valid is None else valid.sum(-1)
    kv.reserve(q, added)
    append_tokens_triton(kv.keys, kv.values, kv.positions, kv.starts, kv.lengths, keys, values, positions, valid)


def compact(kv: FlatKV, keep: torch.Tensor, slack: torch.Tensor | int = 0) -> FlatKV:
    """A new FlatKV with only kv's live entries where keep[slot] is True, each head's
    kept entries contiguous and in their order, then `slack` free slots per head (an
    int or [heads]). With slack 0 it equals FlatKV.compact(keep); kv is unchanged."""
    if use_triton(kv.keys, keep):
        from kvsqueeze.ops.triton_compact import compact_triton

        return compact_triton(kv, keep, slack)
    return _compact_torch(kv, keep, slack)


def _compact_torch(kv: FlatKV, keep: torch.Tensor, slack: torch.Tensor | int) -> FlatKV:
    tight = FlatKV(kv.keys, kv.values, kv.positions, kv.lengths, kv.capacity)
    tight.compact(keep)  # builds new tensors: kv's own are untouched
    if isinstance(slack, int) and slack == 0:
        return tight
    capacity = tight.lengths + slack
    starts = torch.cumsum(capacity, 0) - capacity
    heads = tight.slot_head
    dst = starts[heads] + torch.arange(len(heads), device=heads.device) - tight.starts[heads]
    keys = kv.keys.new_zeros((int(capacity.sum()), kv.head_dim))
    values = torch.zeros_like(keys)
    positions = kv.positions.new_full((len(keys),), -1)
    keys[dst], values[dst], positions[dst] = tight.keys, tight.values, tight.positions
    return FlatKV(keys, values, positions, tight.lengths, capacity)


def keep_from_indices(kv: FlatKV, indices: torch.Tensor) -> torch.Tensor:
    """keep[slots] from per-head kept indices [heads, k] into each head's live run
    (entries < 0 or past the head's length are padding), for compact()."""
    valid = (indices >= 0) & (indices < kv.lengths[:, None])
    slots = (kv.starts[:, None] + indices)[valid]
    keep = torch.zeros(kv.keys.shape[0], dtype=torch.bool, device=kv.keys.device)
    keep[slots] = True
    return keep
