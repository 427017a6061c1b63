"""SnapKV: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvsqueeze.policy.score.base import ScoreInput, attention_probs, reduce_group

POOLS = ("avg", "max", "none")
POOL_ORDERS = ("pool-then-reduce", "reduce-then-pool")


@dataclass(frozen=True)
class SnapKVScorer:
    """Attention of the last `window` prompt queries to every key, summed over the
    window; the prefix before the window is pooled along the sequence (`pool`, `kernel`)
    so that neighbours of a strong key survive with it. `pool` is "avg" (default, with
    kernel 5: SnapKV's released code and kvpress's SnapKVPress), "max" (Ada-KV's code)
    or "none". The window's own keys keep their unpooled sums: the policy protects the
    newest ones, and pooling them would leak window attention into the prefix.

    GQA: `pool_order` "pool-then-reduce" pools each query head, then reduces the group
    by `group_reduce`; "reduce-then-pool" reduces first, as Ada-KV's GQA code does
    (averaging the group's attention, then pooling); with avg pooling and the mean the
    two orders are the same. Only window x tokens logits are formed.
    """

    kernel: int = 5
    pool: str = "avg"
    group_reduce: str = "mean"
    pool_order: str = "pool-then-reduce"
    name: str = "snapkv"
    observes_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV pooling kernel must be odd and >= 1 (it keeps the length), got {self.kernel}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown SnapKV pooling {self.pool!r}: use one of {', '.join(POOLS)}")
        if self.pool_order not in POOL_ORDERS:
            raise ValueError(f"unknown SnapKV pool order {self.pool_order!r}: use one of {', '.join(POOL_ORDERS)}")

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        t = x.keys.shape[2]
        w = min(x.window, t)
        return self.from_window_sums(attention_probs(x, t - w, t).sum(dim=3), w)

    def from_window_sums(self, sums: torch.Tensor, window: int) -> torch.Tensor:
        """scores[b, kv_heads, t] from the window's summed attention sums[b, kv_heads,
        group, t] (the fused GPU scorer computes the sums and comes here too)."""
        if self.pool_order == "reduce-then-pool":
            sums = reduce_group(sums, self.group_reduce).unsqueeze(2)
        b, hkv, g, t = sums.shape
        prefix = t - window
        if prefix > 0 and self.pool != "none":
            pool = F.max_pool1d if self.pool == "max" else F.avg_pool1d
            pooled = pool(
                sums[..., :prefix].reshape(b * hkv * g, 1, prefix),
                kernel_size=self.kernel,
                stride=1,
                padding=self.kernel // 2,
            )
            sums = torch.cat([pooled.view(b, hkv, g, prefix), sums[..., prefix:]], dim=-1)
        return reduce_group(sums, self.group_reduce)
