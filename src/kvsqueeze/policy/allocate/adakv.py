"""Ada-KV: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference", arXiv 2407.11550."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.policy.select import ranks_within


@dataclass(frozen=True)
class AdaKVAllocator:
    """Within a layer, take the global top-(heads x B) scores over all heads of a
    sequence; head i keeps as many tokens as it holds in that top set. The safeguard
    first grants every head its own top floor(alpha x B) tokens, so no head starves.
    The layer's total equals the uniform total.
    """

    alpha: float = 0.2
    name: str = "ada"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Ada-KV safeguard alpha must be in [0, 1], got {self.alpha}")

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        b, h, t = scores.shape
        guaranteed = torch.floor(budget.double() * self.alpha).long().view(b, 1, 1)
        boosted = scores.float().masked_fill(ranks_within(scores) < guaranteed, float("inf"))
        flat_rank = ranks_within(boosted.view(b, h * t)).view(b, h, t)
        chosen = flat_rank < (budget * h).view(b, 1, 1)
        return chosen.sum(dim=-1)
