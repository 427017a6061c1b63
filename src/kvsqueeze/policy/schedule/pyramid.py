"""PyramidKV: Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling", arXiv 2406.02069."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.policy.select import ranks_within


@dataclass(frozen=True)
class PyramidSchedule:
    """Layer budgets fall linearly with depth: the top of the pyramid (the last layer)
    keeps extra/beta tokens beyond the window, the bottom 2·extra - extra/beta, where
    extra = budget - window. Integer budgets are the linear ones rounded by largest
    remainder, so the mean over layers is exactly the requested budget and budgets
    never rise with depth. With `limit` (the prompt length), the bottom is lowered to
    the limit and the top raised by as much, as PyramidKV does, so the mean holds.
    """

    beta: float = 20.0
    name: str = "pyramid"

    def __call__(
        self, budget: torch.Tensor, layer_idx: int, num_layers: int, window: int, limit: torch.Tensor | None = None
    ) -> torch.Tensor:
        if num_layers == 1:
            return budget
        # Budgets at or below the window have nothing to redistribute: they stay flat.
        win = torch.minimum(budget, torch.full_like(budget, window))
        extra = budget - win
        low = extra.double() / self.beta
        high = 2 * extra - low
        if limit is not None:  # no layer may want more than the prompt holds
            high = torch.minimum(high, (limit - win).double()).maximum(extra.double())
            low = 2 * extra - high
        depth = torch.arange(num_layers, dtype=torch.float64, device=budget.device) / (num_layers - 1)
        raw = high[..., None] - (high - low)[..., None] * depth  # [..., layers], falling linearly
        # Floor every layer (a hair low, so float error never rounds up), then give the
        # missing tokens to the largest remainders, earlier layers first on ties: the sum
        # is exact, every layer is within a token of the line, and budgets never rise.
        floors = torch.floor(raw - 1e-9)
        missing = extra * num_layers - floors.long().sum(dim=-1)
        bonus = ranks_within(raw - floors)[..., layer_idx] < missing
        return win + floors[..., layer_idx].long() + bonus.long()
