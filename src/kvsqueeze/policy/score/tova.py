"""TOVA: Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.policy.score.base import ScoreInput, attention_probs, reduce_group


@dataclass(frozen=True)
class TOVAScorer:
    """Attention of the last prompt query to every key, averaged over each GQA group."""

    group_reduce: str = "mean"
    name: str = "tova"

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        t = x.keys.shape[2]
        return reduce_group(attention_probs(x, t - 1, t)[:, :, :, 0], self.group_reduce)
