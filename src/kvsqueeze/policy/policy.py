"""A compression policy: scorer + allocator + layer schedule + budget + protected tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvsqueeze.policy.allocate import Allocator, CrossLayerAllocator, UniformAllocator
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

    `share_scorer`, when set, scores what the allocator splits the budget by, while
    each head still keeps its best tokens by `scorer`. Ada-KV (arXiv 2407.11550) sizes
    a head's share by its observation window's attention; scorers that observe other
    queries (H2O: every prompt query; head-wise TOVA: only the last) are a poor guide
    to which heads the coming queries will read (docs/results/quality_sweep).
    """

    name: str
    scorer: Scorer | None
    budget: Budget = field(default_factory=lambda: Budget(keep=1.0))
    allocator: Allocator | CrossLayerAllocator = field(default_factory=UniformAllocator)
    schedule: LayerSchedule = field(default_factory=FlatSchedule)
    window: int = 32
    sinks: int = 0
    share_scorer: Scorer | None = None

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

    @property
    def across_layers(self) -> bool:
        """True when the allocator ranks all layers of a sequence at once: such a policy
        compresses through keep_masks, with every layer's prefill, not layer by layer."""
        return isinstance(self.allocator, CrossLayerAllocator)

    def keep_mask(
        self, x: ScoreInput, layer_idx: int, num_layers: int, scores: torch.Tensor | None = None
    ) -> torch.Tensor:
        """keep[batch, kv_heads, tokens]: the tokens this layer keeps (never padding).

        `scores` may pass in this policy's scorer output for `x`, computed earlier:
        a sweep over budgets scores each prompt once."""
        b, hkv, t, _ = x.keys.shape
        if not self.compresses:
            return x.valid[:, None, :].expand(b, hkv, t).clone()
        if self.across_layers:
            raise ValueError(
                f"{self.name} allocates across layers: it needs every layer's prefill at once "
                "(Policy.keep_masks), not one layer's"
            )
        scores, budget, visible = self._ranked(x, layer_idx, num_layers, scores)
        counts = self.allocator(self._shares(x, scores), budget)
        return keep_mask(scores, counts) & visible[:, None, :]

    def keep_masks(
        self, prefills: dict[int, ScoreInput], num_layers: int, scores: dict[int, torch.Tensor] | None = None
    ) -> dict[int, torch.Tensor]:
        """keep[batch, kv_heads, tokens] of every layer in `prefills` (layer index -> its
        prefill, all of one batch of prompts), for any policy; a cross-layer allocator
        ranks them all together. `scores` as in keep_mask, by layer index."""
        scores = scores or {}
        if not (self.compresses and self.across_layers):
            return {i: self.keep_mask(x, i, num_layers, scores.get(i)) for i, x in prefills.items()}
        shapes = {tuple(x.keys.shape[:3]) for x in prefills.values()}
        if len(shapes) != 1:
            raise ValueError(f"cross-layer allocation needs every layer's prefill over the same tokens, got {shapes}")
        ranked = {i: self._ranked(x, i, num_layers, scores.get(i)) for i, x in prefills.items()}
        stacked = torch.stack([self._shares(prefills[i], r[0]) for i, r in ranked.items()])
        counts = self.allocator(stacked, torch.stack([r[1] for r in ranked.values()]))
        return {
            i: keep_mask(layer_scores, count) & visible[:, None, :]
            for (i, (layer_scores, _, visible)), count in zip(ranked.items(), counts, strict=True)
        }

    def _shares(self, x: ScoreInput, ranked: torch.Tensor) -> torch.Tensor:
        """What the allocator ranks: `ranked` (the scorer's, masked by _ranked), or the
        share scorer's scores with the same protected and hidden tokens."""
        if self.share_scorer is None:
            return ranked
        shares = self.share_scorer(x).float()
        return shares.masked_fill(ranked.isposinf(), float("inf")).masked_fill(ranked.isneginf(), float("-inf"))

    def _ranked(
        self, x: ScoreInput, layer_idx: int, num_layers: int, scores: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores[b, h, t] with protected tokens at +inf and hidden ones at -inf,
        this layer's per-head budget[b], visible[b, t]) for the allocator."""
        x.require_left_padding()
        visible = x.visible()
        n_visible = visible.sum(dim=-1)
        mean_budget = torch.minimum(self.budget.per_head(x.valid.sum(dim=-1)), n_visible)
        budget = self.schedule(mean_budget, layer_idx, num_layers, self.window, limit=n_visible)
        budget = torch.minimum(budget, n_visible)

        protected = protected_tokens(x.valid, visible, budget, self.window, self.sinks)
        # Short prompts are left untouched, in every layer: a prompt that fits the mean
        # budget is not squeezed by a layer schedule that gives this layer less. All its
        # visible tokens are protected, so that no allocator moves any of them.
        fits = (n_visible <= budget) | (n_visible <= mean_budget)
        protected = torch.where(fits[:, None], visible, protected)
        budget = torch.where(fits, n_visible, budget)
        scores = (self.scorer(x) if scores is None else scores).float()
        scores = scores.masked_fill(protected[:, None, :], float("inf"))
        return scores.masked_fill(~visible[:, None, :], float("-inf")), budget, visible
