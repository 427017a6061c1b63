"""Attention over every head's entries gathered into one padded tensor: one batched
SDPA instead of a launch (and a host sync) per head. The paged reference, the engine's
batched decode and multi-token chunks on the GPU all come here after their gather."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible(positions: torch.Tensor, query_positions: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """[..., q, n]: which entries at positions [..., n] a query at query_positions
    [..., q] sees: those not after it, and inside the sliding window if there is one."""
    pos, q_pos = positions.long()[..., None, :], query_positions.long()[..., :, None]
    allowed = pos <= q_pos
    if sliding_window is not None:
        allowed &= q_pos - pos < sliding_window
    return allowed


def padded_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    live: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    masked: bool = True,
) -> torch.Tensor:
    """Attention of query [heads, group, q, d] at query_positions [heads, q] over padded
    keys/values [heads, L, d] at positions [heads, L], where live[heads, L] marks real
    entries. `masked=False` promises every live entry is visible to every query (a plain
    decode step), which saves building the causal mask. A query that sees nothing gets
    zeros. Keys and values are cast to the query's dtype (a store may hold 16 bits while
    the model computes in fp32). Returns [heads, group, q, d]."""
    h, g, q, d = query.shape
    if keys.shape[1] == 0:
        return query.new_zeros(query.shape)
    mask = live[:, None, :]  # [heads, 1, L]: the padding
    if masked:
        mask = (mask & visible(positions, query_positions, sliding_window)).repeat(1, g, 1)  # rows (group, q)
    # Rows that see nothing (an empty head, or everything after the query) would give NaN:
    # let them see everything, then zero them.
    blind = ~mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(
        query.reshape(h, 1, g * q, d),
        keys[:, None].to(query.dtype),
        values[:, None].to(query.dtype),
        attn_mask=(mask | blind)[:, None],
        scale=scaling,
    )
    return out.masked_fill(blind[:, None], 0.0).view(h, g, q, d)
