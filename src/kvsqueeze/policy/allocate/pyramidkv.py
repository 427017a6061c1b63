"""PyramidKV: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlatSchedule:
    """Every layer gets the same budget."""

    name: str = "flat"

    def __call__(self, budget: torch.Tensor, layer_idx: int, num_layers: int, window: int) -> torch.Tensor:
        return budget


@dataclass(frozen=True)
class PyramidSchedule:
    """Layer budgets fall linearly with depth: the top of the pyramid (the last layer)
    keeps extra/beta tokens beyond the window, the bottom 2·extra - extra/beta, where
    extra = budget - window. Integer budgets come from rounding the running sum, so
    the mean over layers is exactly the requested budget.
    """

    beta: float = 20.0
    name: str = "pyramid"

    def __call__(self, budget: torch.Tensor, layer_idx: int, num_layers: int, window: int) -> torch.Tensor:
        if num_layers == 1:
            return budget
        # Budgets at or below the window have nothing to redistribute.
        win = torch.where(budget > window, torch.full_like(budget, window), torch.zeros_like(budget))
        extra = (budget - win).double()
        low = extra / self.beta
        high = 2 * extra - low
        step = (high - low) / (num_layers - 1)

        def running_sum(n: int) -> torch.Tensor:  # sum of the first n raw layer budgets
            return n * high - step * n * (n - 1) / 2

        share = torch.round(running_sum(layer_idx + 1)) - torch.round(running_sum(layer_idx))
        return win + share.long()
