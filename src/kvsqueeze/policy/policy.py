"""A compression policy: scorer + allocator + layer schedule + budget + protected tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsqueeze.policy.allocate import Allocator, UniformAllocator
from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.protect import protected_tokens
from kvsqueeze.policy.schedule import FlatSchedule, LayerSchedule
from kvsqueeze.policy.score import ScoreInput, Scorer
from kvsqueeze.policy.select import keep_mask


@dataclass(frozen=True)
class Policy:
    """What to keep after prefill, for one layer at a time.

    scorer=None keeps everything (the `full` policy). The last `window` prompt tokens
    and the first `sinks` tokens of every head are kept inside the budget (see
    protect.py for how they shrink when the budget is small). Tokens a sliding window
    hides from the last prompt query are never kept, and budgets count only the
    visible tokens: a sequence whose visible tokens fit its budget (or this layer's)
    keeps all of them. Batches must be left-padded.
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
        if self.window == 0 and self.scorer is not None and self.scorer.observes_queries:
            raise ValueError(
                f"window 0 leaves {self.scorer.name} no prompt query to observe and the last prompt token "
                "unprotected: use a window of at least 1"
            )

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
        if not self.compresses:
            return x.valid[:, None, :].expand(b, hkv, t).clone()
        x.require_left_padding()
        visible = x.visible()
        n_visible = visible.sum(dim=-1)
        mean_budget = torch.minimum(self.budget.per_head(x.valid.sum(dim=-1)), n_visible)
        budget = self.schedule(mean_budget, layer_idx, num_layers, self.window, limit=n_visible)
        budget = torch.minimum(budget, n_visible)

        protected = protected_tokens(x.valid, visible, budget, self.window, self.sinks)[:, None, :]
        scores = (self.scorer(x) if scores is None else scores).float()
        scores = scores.masked_fill(protected, float("inf")).masked_fill(~visible[:, None, :], float("-inf"))

        counts = self.allocator(scores, budget)
        visible = visible[:, None, :].expand(b, hkv, t)
        keep = keep_mask(scores, counts) & visible
        # Short prompts are left untouched, in every layer: a prompt that fits the mean
        # budget is not squeezed by a layer schedule that gives this layer less.
        fits = ((n_visible <= budget) | (n_visible <= mean_budget)).view(b, 1, 1)
        return torch.where(fits, visible, keep)
