"""KNorm: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", arXiv 2406.11430."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput


@dataclass(frozen=True)
class KNormScorer:
    """Keys with a low L2 norm draw the most attention, so keep the lowest norms."""

    name: str = "knorm"
    observes_queries: ClassVar[bool] = False

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        return -x.keys.float().norm(dim=-1)
