"""Causal attention over dense K/V with a padding mask: the prefill path, before any
compression, and the path for caches that are not ours."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Query rows per masked SDPA call: a [batch, 1, rows, keys] bool mask per block is
# 32 MiB at 32k keys, where one mask for the whole prompt would be 1 GiB per sequence.
MASK_BLOCK = 1024


def dense_causal_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """query [b, q_heads, q, d] are the last q positions of keys/values [b, kv_heads, k, d];
    valid [b, k] marks real (non-padding) keys, None when nothing is padded.
    Returns [b, q_heads, q, d]."""
    q_len, k_len = query.shape[2], keys.shape[2]
    if valid is None and sliding_window is None and q_len == k_len:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling, enable_gqa=True)
    out = torch.empty_like(query)
    for start in range(0, q_len, MASK_BLOCK):
        end = min(start + MASK_BLOCK, q_len)
        # Keys this block can see: causal up to its last query, and within the window.
        k_end = k_len - q_len + end
        k_start = 0 if sliding_window is None else max(0, k_len - q_len + start - sliding_window + 1)
        out[:, :, start:end] = _masked_block(
            query[:, :, start:end],
            keys[:, :, k_start:k_end],
            values[:, :, k_start:k_end],
            None if valid is None else valid[:, k_start:k_end],
            scaling,
            sliding_window,
        )
    return out


def _masked_block(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """dense_causal_attention for queries that are the last positions of `keys`, with an
    explicit mask."""
    q_len, k_len = query.shape[2], keys.shape[2]
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)
    k_pos = torch.arange(k_len, device=query.device)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < sliding_window)
    mask = allowed[None, None]
    if valid is not None:
        mask = mask & valid[:, None, None, :]
        # A padding query sees nothing; let it see itself so softmax stays finite.
        mask = mask | (q_pos[:, None] == k_pos[None, :])[None, None]
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=True)
