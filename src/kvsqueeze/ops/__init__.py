"""Attention over the stored KV: torch references here, GPU kernels beside them.

`attend` is the entry point for attention over any store (FlatKV or PagedKV). The
dispatchers (attend, ragged_attention, paged_attention, append_tokens, evict,
policy_scores) take the Triton kernels (triton_*.py) for CUDA tensors when triton is
installed, and the torch references otherwise; triton is imported only then. ops/
reads stores only through their interface (store/base.py) and their own layout
methods: the arithmetic of each layout stays in store/.
"""

from kvsqueeze.ops.attend import attend
from kvsqueeze.ops.dense_attention import dense_causal_attention
from kvsqueeze.ops.kv_update import append_tokens, evict, keep_from_indices
from kvsqueeze.ops.paged_attention import paged_attention, paged_attention_reference
from kvsqueeze.ops.ragged_attention import ragged_attention, ragged_attention_reference
from kvsqueeze.ops.scoring import policy_scores

__all__ = [
    "append_tokens",
    "attend",
    "dense_causal_attention",
    "evict",
    "keep_from_indices",
    "paged_attention",
    "paged_attention_reference",
    "policy_scores",
    "ragged_attention",
    "ragged_attention_reference",
]
