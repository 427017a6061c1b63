"""Scoring a prefill for a policy, with the fused Triton SnapKV scorer on CUDA.

policy/ must not import ops/, so the policy's scorers stay plain torch; a caller that
has both (the cache) asks here for the scores and hands them to
Policy.keep_mask(..., scores=...). Any scorer other than SnapKV, any CPU tensor, or
a window the kernel does not take, gets the policy's own scorer: same numbers (the
kernel masks by x.sliding_window and pools through the scorer, as scorer(x) does).
"""

from __future__ import annotations

import torch

from kvsqueeze.ops._triton import use_triton
from kvsqueeze.policy.score import ScoreInput, Scorer, SnapKVScorer


def policy_scores(scorer: Scorer, x: ScoreInput) -> torch.Tensor:
    """scorer(x): scores[batch, kv_heads, tokens], fused on GPU where supported."""
    if isinstance(scorer, SnapKVScorer) and use_triton(x.queries, x.keys):
        from kvsqueeze.ops import triton_snapkv

        if triton_snapkv.supports(x.queries, x.window):
            return triton_snapkv.snapkv_scores_for(scorer, x)
    return scorer(x)
