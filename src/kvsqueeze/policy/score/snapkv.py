"""SnapKV: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
arXiv 2404.14469."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsqueeze.policy.score.base import ScoreInput, attention_probs, reduce_group


@dataclass(frozen=True)
class SnapKVScorer:
    """Attention of the last `window` prompt queries to every key, summed over the
    window, max-pooled along the sequence so that neighbours of a strong key survive
    with it, then reduced over each GQA group. Only window x tokens logits are formed.
    """

    kernel: int = 7
    group_reduce: str = "mean"
    name: str = "snapkv"

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        t = x.keys.shape[2]
        w = min(x.window, t)
        probs = attention_probs(x, t - w, t).sum(dim=3)  # [b, hkv, g, t]
        b, hkv, g, _ = probs.shape
        pooled = F.max_pool1d(
            probs.view(b * hkv * g, 1, t), kernel_size=self.kernel, stride=1, padding=self.kernel // 2
        ).view(b, hkv, g, t)
        return reduce_group(pooled, self.group_reduce)
