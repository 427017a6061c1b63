"""Uniform allocation: every head of a layer keeps the same number of tokens
(SnapKV, H2O, StreamingLLM as published)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UniformAllocator:
    """counts[b, h] = budget[b] for every head h."""

    name: str = "uniform"

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        b, h, _ = scores.shape
        return budget.view(b, 1).expand(b, h).clone()
