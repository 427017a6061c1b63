"""DefensiveKV: Feng et al., "Taming the Fragility of KV Cache Eviction in LLM Inference",
arXiv 2510.13334 (the authors' code: EfficientDefensiveKVPress in github.com/FFY0/DefensiveKV)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput, attention_probs
from kvsqueeze.policy.score.criticalkv import value_norms
from kvsqueeze.policy.score.snapkv import SnapKVScorer


@dataclass(frozen=True)
class DefensiveKVScorer:
    """Defensive aggregation of the window's attention: a key's score is the most attention
    any one of the last `window` prompt queries pays it, over every query head of its GQA
    group, not the mean over the window. The mean assumes future queries look like the
    average recent one; the maximum keeps a key that any recent query needs strongly, and
    bounds the worst case when a future query looks like that one.

    As the authors' code, in two steps: (1) each (query head, window query) attention row
    is pooled along the prefix as SnapKV pools (`pool`, `kernel`; avg and 5 by default, as
    theirs), and a key takes the maximum over the rows; (2) every visible key's score is
    floored at the mean score of the head's visible prefix keys (the keys before the window),
    so the keys no window query singles out tie at an average-key prior instead of being
    ranked by noise. With `value_norm` (default, as the authors' release does, borrowing
    from CriticalKV) the result is multiplied by the value's L1 norm (see
    criticalkv.value_norms).

    The GQA group is always reduced by the maximum (the worst case over the group's query
    heads is part of the method), so `group_reduce` does not apply, as for KVzip. Not
    implemented from the authors' code: rescaling each pooled row to its unpooled mass,
    the projection by W_o and normalisation of the value norms across heads, and
    CriticalKV's first stage (keys holding 90% of the attention kept first): a scorer sees
    neither the model's weights nor the budget.
    """

    kernel: int = 5
    pool: str = "avg"
    value_norm: bool = True
    name: str = "defensivekv"
    observes_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _ = self.rows  # SnapKV validates the pooling options now, not at the first prefill

    @cached_property
    def rows(self) -> SnapKVScorer:
        """Pools attention rows [b, kv_heads, rows, t] along the prefix and takes the max over rows."""
        return SnapKVScorer(kernel=self.kernel, pool=self.pool, group_reduce="max")

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        t = x.keys.shape[2]
        w = min(x.window, t)
        probs = attention_probs(x, t - w, t)  # [b, kv_heads, group, window, t]
        worst = self.rows.from_window_sums(probs.flatten(2, 3), w)  # one row per (query head, window query)
        visible = x.visible()[:, None, :].float()
        prefix = visible[..., : t - w]
        floor = (worst[..., : t - w] * prefix).sum(dim=-1, keepdim=True) / prefix.sum(dim=-1, keepdim=True).clamp_min(1)
        scores = worst.maximum(floor) * visible
        return scores * value_norms(x) if self.value_norm else scores
