"""Eviction during decoding: when a head's run passes `max_kv_tokens`, the sequence's
policy evicts from that head, scoring with the most recent queries, so that long
generations stay within a per-head budget (the "during decoding" mode of DESIGN.md).

A head over the cap is cut to 7/8 of it, not to the cap itself, so eviction runs once
every cap/8 steps rather than at every step. The policy sees each kv-head as its own
sequence: the head's entries are right-aligned (left padding, as policies expect),
the recent queries stand at the last positions, the budget is a token count and the
layer schedule is flat. Window and sinks stay protected as after the prefill.
Per-chunk prompt compression (kv_cache.py) cuts heads the same way, to the budget.
"""

from __future__ import annotations

import dataclasses

import torch

from kvsqueeze.policy import Budget, Policy, ScoreInput
from kvsqueeze.policy.allocate import UniformAllocator
from kvsqueeze.policy.schedule import FlatSchedule
from kvsqueeze.store import PagedKV


def evict_heads(
    policy: Policy,
    layer_idx: int,
    num_layers: int,
    store: PagedKV,
    recent: torch.Tensor,
    cap: int,
    target: int,
    scaling: float,
) -> bool:
    """Evict every head of `store` holding more than `cap` entries down to `target`,
    scored by the recent queries [q_heads, w, d]. Returns whether anything was evicted."""
    lengths = store.lengths.cpu()
    over = lengths > cap
    if not bool(over.any()):
        return False
    keys, values, _, live = store.padded()  # [hkv, L, d], right-padded
    hkv, longest, d = keys.shape
    shift = (longest - lengths).to(keys.device)  # left padding of each head
    column = torch.arange(longest, device=keys.device)[None, :]
    source = (column - shift[:, None]).clamp_min(0)  # left-aligned slot -> entry index
    valid = column >= shift[:, None]
    left_keys = keys.gather(1, source[..., None].expand(-1, -1, d)).to(recent.dtype)
    left_values = values.gather(1, source[..., None].expand(-1, -1, d)).to(recent.dtype)
    group, w = recent.shape[0] // hkv, min(recent.shape[1], longest)
    queries = recent.new_zeros(hkv, group, longest, d)
    queries[:, :, longest - w :] = recent[:, recent.shape[1] - w :].view(hkv, group, w, d)
    x = ScoreInput(queries, left_keys[:, None], left_values[:, None], valid, scaling, min(policy.window, w))
    # Each head is its own sequence here: there is nothing to allocate between heads or layers.
    cut = dataclasses.replace(
        policy, budget=Budget(tokens=target), schedule=FlatSchedule(), allocator=UniformAllocator(), share_scorer=None
    )
    keep_left = cut.keep_mask(x, layer_idx, num_layers)[:, 0]  # [hkv, L], left-aligned
    keep = keep_left.gather(1, (column + shift[:, None]).clamp_max(longest - 1)) & live
    keep[~over.to(keep.device)] = live[~over.to(keep.device)]
    store.evict(keep)
    return True
