"""The allocation interface: how a layer's budget is split over its heads."""

from __future__ import annotations

from typing import Protocol

import torch


class Allocator(Protocol):
    """Splits a layer budget over its heads: (scores[b, h, t], budget[b]) -> counts[b, h].

    Scores follow Policy.keep_mask's contract: the protected tokens (window, sinks)
    score +inf, the same number in every head of a sequence, and padding or tokens a
    sliding window hides score -inf. Every head's count covers its protected tokens.
    """

    name: str

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor: ...
