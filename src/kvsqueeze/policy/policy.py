"""A compression policy: scorer + allocator + layer schedule + budget + protected tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsqueeze.policy.allocate import Allocator, FlatSchedule, LayerSchedule, UniformAllocator
from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.score import ScoreInput, Scorer
from kvsqueeze.policy.select import keep_mask


@dataclass(frozen=True)
class Policy:
    """What to keep after prefill, for one layer at a time.

    scorer=None keeps everything (the `full` policy). The last `window` prompt tokens
    and the first `sinks` tokens of every head are always kept, inside the budget.
    A sequence whose prompt fits its budget (or this layer's) is left untouched.
    """

    name: str
    scorer: Scorer | None
    budget: Budget = field(default_factory=lambda: Budget(keep=1.0))
    allocator: Allocator = field(default_factory=UniformAllocator)
    schedule: LayerSchedule = field(default_factory=FlatSchedule)
    window: int = 32
    sinks: int = 0

    def __post_init__(self) -> None:
        if self.window < 0 or self.sinks < 0:
            raise ValueError(f"window and sinks must be >= 0, got window={self.window}, sinks={self.sinks}")

    @property
    def compresses(self) -> bool:
        return self.scorer is not None and not self.budget.is_full

    def keep_mask(
        self, x: ScoreInput, layer_idx: int, num_layers: int, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """keep[batch, kv_heads, tokens]: the tokens this layer keeps (never padding).

        `scores` may pass in this policy's scorer output for `x`, computed earlier:
        a sweep over budgets scores each prompt once."""
        b, hkv, t, _ = x.keys.shape
        valid = x.valid[:, None, :].expand(b, hkv, t)
        if not self.compresses:
            return valid.clone()
        n_valid = x.valid.sum(dim=-1)
        mean_budget = self.budget.per_head(n_valid)
        budget = self.schedule(mean_budget, layer_idx, num_layers, self.window, limit=n_valid)
        budget = torch.minimum(budget, n_valid)

        scores = (self.scorer(x) if scores is None else scores).float().clone()
        slot = torch.arange(t, device=scores.device)
        first_valid = (t - n_valid).view(b, 1)  # left padding: real tokens are the last n_valid slots
        protected_window = slot >= (t - torch.minimum(budget, torch.full_like(budget, self.window))).view(b, 1)
        protected_sinks = slot < first_valid + min(self.sinks, t)
        protected = (protected_window | protected_sinks)[:, None, :]
        scores = scores.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))

        counts = self.allocator(scores, budget)
        keep = keep_mask(scores, counts) & valid
        # Short prompts are left untouched, in every layer: a prompt that fits the mean
        # budget is not squeezed by a layer schedule that gives this layer less.
        fits = ((n_valid <= budget) | (n_valid <= mean_budget)).view(b, 1, 1)
        return torch.where(fits, valid, keep)
