"""Cross-layer allocation: Rehg, "KV-Compress: Paged KV-Cache Compression with Variable
Compression Rates per Attention Head", arXiv 2410.00161."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvsqueeze.policy.allocate.adakv import max_pooled
from kvsqueeze.policy.select import ranks_within


@dataclass(frozen=True)
class CrossLayerAllocator:
    """One ranking over every layer and head of a sequence, as KV-Compress evicts by a
    metric sorted across all layers and heads: (scores[L, b, h, t], budget[L, b]) ->
    counts[L, b, h], where budget[l] is layer l's per-head budget. The sequence's total
    equals the uniform total (sum over layers of heads x budget), so layers and heads
    whose attention is spread out keep more and those that concentrate it keep less.

    Starvation is prevented as Ada-KV's paper does within a layer (arXiv 2407.11550):
    with W protected tokens (+inf scores) and B' = B - W in a layer, each of its heads
    first keeps W and its own best floor(alpha B') tokens; all other slots go to the
    best of the remaining tokens over all layers and heads together. `pool_kernel` (odd;
    1 ranks the raw scores) counts on scores max-pooled along the sequence, as
    AdaKVAllocator does, so that a peak wins its neighbours too; the tokens kept are
    still each head's best by its own scores. Ranking layers against each other assumes
    comparable scores: attention mass (SnapKV, H2O, TOVA) sums to one per query in
    every layer, key norms or random scores carry no such scale.
    """

    alpha: float = 0.2
    pool_kernel: int = 7
    name: str = "cross"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"cross-layer safeguard alpha must be in [0, 1], got {self.alpha}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"cross-layer pooling kernel must be odd and >= 1, got {self.pool_kernel}")

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        if scores.dim() != 4 or budget.shape != scores.shape[:2]:
            raise ValueError(
                f"cross-layer allocation takes scores [layers, batch, heads, tokens] and budget [layers, batch], "
                f"got {tuple(scores.shape)} and {tuple(budget.shape)}"
            )
        layers, b, h, t = scores.shape
        protected = scores.isposinf()
        n_protected = protected.sum(dim=-1)  # [L, b, h], equal over a layer's heads
        rest = budget[..., None] - n_protected  # B' per head
        floor = torch.floor(rest.double() * self.alpha).long()
        free = scores.float().masked_fill(protected, float("-inf"))
        if self.pool_kernel > 1:
            free = max_pooled(free, self.pool_kernel)
        # Each head's own floor comes first; the remaining slots of all layers are contested.
        contest = free.masked_fill(ranks_within(free) < floor[..., None], float("-inf"))
        pool = (rest - floor).sum(dim=(0, 2))  # [b]
        ranked = ranks_within(contest.transpose(0, 1).reshape(b, layers * h * t))
        # Only real candidates win: a sequence with fewer candidates than slots keeps them all.
        won = (ranked < pool[:, None]) & (contest.transpose(0, 1).reshape(b, -1) > float("-inf"))
        won = won.view(b, layers, h, t).transpose(0, 1).sum(dim=-1)
        return n_protected + floor + won
