"""TOVA: Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput, attention_probs, reduce_group


@dataclass(frozen=True)
class TOVAScorer:
    """Head-wise TOVA, one-shot after prefill: attention of the last prompt query to
    every key, one score per kv head (reduced over its GQA group), so heads keep
    different tokens. TOVA's paper and kvpress average over all heads of a layer
    (layer-wise: every head keeps the same tokens)."""

    group_reduce: str = "mean"
    name: str = "tova"
    observes_queries: ClassVar[bool] = True

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        t = x.keys.shape[2]
        return reduce_group(attention_probs(x, t - 1, t)[:, :, :, 0], self.group_reduce)
