"""Attention over the stored KV: torch references here, GPU kernels beside them.

The dispatchers (ragged_attention, append_tokens, compact, policy_scores) take the
Triton kernels (triton_*.py) for CUDA tensors when triton is installed, and the torch
references otherwise; triton is imported only then.
"""

from kvsqueeze.ops.dense_attention import dense_causal_attention
from kvsqueeze.ops.kv_update import append_tokens, compact, keep_from_indices
from kvsqueeze.ops.ragged_attention import ragged_attention, ragged_attention_reference
from kvsqueeze.ops.scoring import policy_scores

__all__ = [
    "append_tokens",
    "compact",
    "dense_causal_attention",
    "keep_from_indices",
    "policy_scores",
    "ragged_attention",
    "ragged_attention_reference",
]
