"""Head-wise TOVA: TOVA (Oren et al., "Transformers are Multi-State RNNs", arXiv
2401.06104) ranked per kv head instead of per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput, attention_probs, reduce_group


@dataclass(frozen=True)
class TOVAHeadScorer:
    """The last prompt query's attention to every key, one score per kv head (its GQA
    group reduced by `group_reduce`), so heads keep different tokens. Not the paper's
    rule (see TOVAScorer, layer-wise); kept because on SmolLM2-135M's needle a
    retrieval head's attention to the needle is drowned in the layer average, and the
    per-head ranking keeps it more often (README, Policies)."""

    group_reduce: str = "mean"
    name: str = "tova-head"
    observes_queries: ClassVar[bool] = True

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        t = x.keys.shape[2]
        return reduce_group(attention_probs(x, t - 1, t)[:, :, :, 0], self.group_reduce)
