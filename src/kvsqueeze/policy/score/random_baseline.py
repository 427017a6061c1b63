"""Random eviction: the baseline every scorer must beat (as in kvpress's RandomPress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput


@dataclass(frozen=True)
class RandomScorer:
    """Uniform random scores from a fixed seed, so runs are reproducible."""

    seed: int = 0
    name: str = "random"
    observes_queries: ClassVar[bool] = False

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        b, hkv, t, _ = x.keys.shape
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        return torch.rand((b, hkv, t), generator=gen).to(x.keys.device)
