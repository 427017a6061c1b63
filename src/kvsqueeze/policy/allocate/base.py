"""The two allocation interfaces: across heads of a layer, and across layers."""

from __future__ import annotations

from typing import Protocol

import torch


class Allocator(Protocol):
    """Splits a layer budget over its heads: (scores[b, h, t], budget[b]) -> counts[b, h]."""

    name: str

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor: ...


class LayerSchedule(Protocol):
    """Splits the mean per-head budget over layers: budget[b] -> this layer's budget[b].
    `limit[b]`, when given, is the most any layer can keep (the prompt length)."""

    name: str

    def __call__(
        self, budget: torch.Tensor, layer_idx: int, num_layers: int, window: int, limit: torch.Tensor | None = None
    ) -> torch.Tensor: ...
