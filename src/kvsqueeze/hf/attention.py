"""The "kvsqueeze" attention and mask functions, registered with transformers by name.

The mask function hands the attention the 2D padding mask (or None): the cache knows
its own per-head validity, so no 4D mask is ever built. The attention function
delegates to the cache layer when the model runs with a KVSqueezeCache and attends
densely otherwise (e.g. a forward without any cache).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvsqueeze.hf.cache import ATTENTION_NAME, PendingStep
from kvsqueeze.ops import dense_causal_attention


def kvsqueeze_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The 2D padding mask [batch, kv_length] as bool, or None when nothing is padded."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    return None if bool(mask.all()) else mask


def kvsqueeze_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor | PendingStep,
    value: torch.Tensor | PendingStep,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("kvsqueeze attention takes a 2D padding mask, not a prepared 4D mask")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if isinstance(key, PendingStep):
        out = key.layer.attend(query, key, attention_mask, scaling, sliding_window)
    else:
        out = dense_causal_attention(query, key, value, attention_mask, scaling, sliding_window)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, kvsqueeze_attention)
AttentionMaskInterface.register(ATTENTION_NAME, kvsqueeze_mask)
