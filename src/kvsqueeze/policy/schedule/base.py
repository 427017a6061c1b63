"""The layer-schedule interface: how the mean per-head budget is split over layers."""

from __future__ import annotations

from typing import Protocol

import torch


class LayerSchedule(Protocol):
    """Splits the mean per-head budget over layers: budget[b] -> this layer's budget[b].
    `limit[b]`, when given, is the most any layer can keep (the prompt length)."""

    name: str

    def __call__(
        self, budget: torch.Tensor, layer_idx: int, num_layers: int, window: int, limit: torch.Tensor | None = None
    ) -> torch.Tensor: ...
