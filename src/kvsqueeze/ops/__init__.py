"""Attention over the stored KV: torch references here, GPU kernels beside them."""

from kvsqueeze.ops.dense_attention import dense_causal_attention
from kvsqueeze.ops.ragged_attention import ragged_attention

__all__ = ["dense_causal_attention", "ragged_attention"]
