"""The flat schedule: every layer keeps the same budget (SnapKV, H2O, Ada-KV as published)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlatSchedule:
    """Every layer gets the mean budget."""

    name: str = "flat"

    def __call__(
        self, budget: torch.Tensor, layer_idx: int, num_layers: int, window: int, limit: torch.Tensor | None = None
    ) -> torch.Tensor:
        return budget
