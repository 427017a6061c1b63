"""H2O / observed attention: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv 2306.14048."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput, attention_probs, reduce_group


@dataclass(frozen=True)
class H2OScorer:
    """One-shot H2O: attention mass each key receives from every prompt query (the
    accumulated attention of H2O), summed, not divided by how many queries saw the
    key; scored once after prefill, not re-scored while decoding. It needs the full
    prompt x prompt attention, so queries are processed in chunks to bound memory.
    """

    chunk: int = 512
    group_reduce: str = "mean"
    name: str = "h2o"
    observes_queries: ClassVar[bool] = True

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        t = x.keys.shape[2]
        total = None
        for start in range(0, t, self.chunk):
            part = attention_probs(x, start, min(start + self.chunk, t)).sum(dim=3)
            total = part if total is None else total + part
        return reduce_group(total, self.group_reduce)
