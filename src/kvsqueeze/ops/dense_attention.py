"""Causal attention over dense K/V with a padding mask: the prefill path, before any
compression, and the path for caches that are not ours."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_causal_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """query [b, q_heads, q, d] are the last q positions of keys/values [b, kv_heads, k, d];
    valid [b, k] marks real (non-padding) keys. Returns [b, q_heads, q, d]."""
    q_len, k_len = query.shape[2], keys.shape[2]
    if (valid is None or bool(valid.all())) and sliding_window is None and q_len == k_len:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scaling, enable_gqa=True)
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
