"""Ada-KV: Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
Allocation for Efficient LLM Inference", arXiv 2407.11550."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsqueeze.policy.select import ranks_within

SAFEGUARDS = ("paper", "kvpress")


@dataclass(frozen=True)
class AdaKVAllocator:
    """Within a layer, heads whose attention is spread out get more of the layer's
    heads x B slots than heads whose attention is concentrated; the layer total
    equals the uniform total. `safeguard` says how starvation is prevented:

    - "paper" (default), the rule of the Ada-KV paper and its code: with W protected
      tokens per head and B' = B - W, head i keeps W + floor(alpha B') + its share
      of the remaining heads x (B' - floor(alpha B')) slots, in proportion to how
      many of its tokens are in the global top-(heads x B') of the unprotected
      scores (not boosted by the floor). Every head keeps >= W + int(alpha (B - W)).
    - "kvpress": kvpress's AdaKVPress: each head's own top floor(alpha B) tokens are
      boosted to +inf, then the global top-(heads x B) is taken. Protected tokens
      already rank first, so this floor adds nothing until alpha B exceeds W.

    `pool_kernel` (default 7; 1 is the paper's and kvpress's plain rule) counts the
    heads' shares on scores max-pooled along the sequence
    (the tokens kept are still each head's best by its own scores), as Ada-KV's code
    takes its global top-k on SnapKV scores max-pooled with kernel 7. Why: a head whose
    observed attention is peaked on a few keys (one query, as TOVA's) otherwise wins
    only those peaks and the floor, and loses the neighbours later queries need.
    """

    alpha: float = 0.2
    safeguard: str = "paper"
    pool_kernel: int = 7
    name: str = "ada"

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Ada-KV safeguard alpha must be in [0, 1], got {self.alpha}")
        if self.safeguard not in SAFEGUARDS:
            raise ValueError(f"unknown Ada-KV safeguard {self.safeguard!r}: use one of {', '.join(SAFEGUARDS)}")
        if self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            raise ValueError(f"Ada-KV pooling kernel must be odd and >= 1, got {self.pool_kernel}")

    def __call__(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        if self.pool_kernel > 1:
            scores = max_pooled(scores, self.pool_kernel)
        if self.safeguard == "kvpress":
            return self._kvpress(scores, budget)
        return self._paper(scores, budget)

    def _kvpress(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        b, h, t = scores.shape
        guaranteed = torch.floor(budget.double() * self.alpha).long().view(b, 1, 1)
        boosted = scores.float().masked_fill(ranks_within(scores) < guaranteed, float("inf"))
        flat_rank = ranks_within(boosted.view(b, h * t)).view(b, h, t)
        return (flat_rank < (budget * h).view(b, 1, 1)).sum(dim=-1)

    def _paper(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        b, h, t = scores.shape
        protected = scores.isposinf()
        n_protected = protected.sum(dim=-1)  # [b, h], equal over heads
        rest = budget.view(b, 1) - n_protected  # B' per head
        floor = torch.floor(rest.double() * self.alpha).long()
        # Unboosted global top-(heads x B') over the unprotected tokens, counted per head.
        free = scores.float().masked_fill(protected, float("-inf"))
        flat_rank = ranks_within(free.view(b, h * t)).view(b, h, t)
        in_top = (flat_rank < rest.sum(dim=-1).view(b, 1, 1)).sum(dim=-1)
        # Ada-KV's code gives head i round(in_top_i x (1 - alpha) + floor), which falls short
        # of the layer total when alpha B' is not whole. Sharing the adaptive slots in
        # proportion to in_top is the same rule with an exact total; largest-remainder
        # rounding (only to heads with tokens left) keeps it exact in integers.
        adaptive = (rest - floor).sum(dim=-1, keepdim=True)
        share = in_top.double() * adaptive / rest.sum(dim=-1, keepdim=True).clamp_min(1)
        whole = torch.floor(share).long()
        candidates = (free > float("-inf")).sum(dim=-1)
        remainder = (share - whole).masked_fill(floor + whole >= candidates, -1.0)
        bonus = ranks_within(remainder) < (adaptive - whole.sum(dim=-1, keepdim=True))
        return n_protected + floor + whole + bonus.long()


def max_pooled(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pool scores[..., tokens] along the tokens; protected (+inf) and hidden (-inf)
    tokens stay as they are and lend nothing to their neighbours."""
    protected, hidden = scores.isposinf(), scores.isneginf()
    free = scores.float().masked_fill(protected | hidden, float("-inf"))
    t = free.shape[-1]
    pooled = F.max_pool1d(free.reshape(-1, 1, t), kernel, stride=1, padding=kernel // 2)
    pooled = pooled.view(free.shape).masked_fill(hidden, float("-inf"))
    return pooled.masked_fill(protected, float("inf"))
