"""Attention over ragged per-head KV (FlatKV): the torch reference.

It runs anywhere and is the oracle for the GPU kernels. Every (sequence, kv-head) is
one segment of keys; its GQA group of query heads reads that segment directly, so
K/V are never repeated. Segment softmax is done with scatter/index-add over slots.
"""

from __future__ import annotations

import torch

from kvsqueeze.store import FlatKV

# Bound on the slots x group x queries x head_dim intermediate, so a long continued
# prompt over a big cache runs in query chunks instead of exhausting memory.
MAX_INTERMEDIATE = 1 << 25


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
    sliding window, fewer than `sliding_window` behind it). Returns [heads, group, q, head_dim].
    """
    h, g, q, d = query.shape
    slots = kv.keys.shape[0]
    chunk = max(1, MAX_INTERMEDIATE // max(1, slots * g * d))
    if q > chunk:
        parts = [
            ragged_attention(query[:, :, i : i + chunk], kv, query_positions[:, i : i + chunk], scaling, sliding_window)
            for i in range(0, q, chunk)
        ]
        return torch.cat(parts, dim=2)

    head = kv.slot_head
    pos = kv.positions.long()
    q_pos = query_positions.long()[head]  # [slots, q]
    allowed = (pos >= 0)[:, None] & (pos[:, None] <= q_pos)
    if sliding_window is not None:
        allowed &= q_pos - pos[:, None] < sliding_window

    keys = kv.keys.float()
    logits = torch.einsum("sgqd,sd->sgq", query.float()[head], keys).mul_(scaling)
    logits.masked_fill_(~allowed[:, None, :], float("-inf"))
    seg_max = torch.full((h, g, q), float("-inf"), device=query.device)
    seg_max.scatter_reduce_(0, head.view(slots, 1, 1).expand(slots, g, q), logits, "amax")
    seg_max.nan_to_num_(neginf=0.0)  # heads with no visible entry: keep exp() finite
    weights = torch.exp(logits - seg_max[head])
    denom = torch.zeros((h, g, q), device=query.device).index_add_(0, head, weights)
    out = torch.zeros((h, g * q, d), device=query.device)
    out.index_add_(0, head, weights.view(slots, g * q, 1) * kv.values.float()[:, None, :])
    out = out.view(h, g, q, d) / denom.clamp_min(1e-30)[..., None]
    return out.to(query.dtype)
