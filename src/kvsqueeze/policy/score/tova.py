"""TOVA: Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput, attention_probs


@dataclass(frozen=True)
class TOVAScorer:
    """TOVA, one-shot after prefill, layer-wise as the paper and kvpress's TOVAPress:
    the last prompt query's attention to every key, averaged over all query heads of
    the layer, so every kv head gets the same scores and keeps the same tokens.

    Why layer-wise: one query's attention in one head is very peaked, and a head-wise
    ranking of it throws away tokens that other heads of the layer (and the next
    queries) still need; the layer average is the paper's rule and keeps them.
    """

    name: str = "tova"
    observes_queries: ClassVar[bool] = True

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        b, hkv, t, _ = x.keys.shape
        last = attention_probs(x, t - 1, t)[:, :, :, 0]  # [b, kv_heads, group, t]
        return last.mean(dim=(1, 2))[:, None, :].expand(b, hkv, t).contiguous()
