"""CriticalKV: Feng et al., "Identify Critical KV Cache in LLM Inference from an Output
Perturbation Perspective", arXiv 2502.03805 (v2: "CriticalKV: Optimizing KV Cache Eviction
from an Output Perturbation Perspective"; the authors' code, and kvpress's CriticalKVPress)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput
from kvsqueeze.policy.score.snapkv import SnapKVScorer


def value_norms(x: ScoreInput) -> torch.Tensor:
    """[batch, kv_heads, tokens]: the L1 norm of every value, CriticalKV's measure of how far
    evicting a key can move the attention output.

    The paper bounds the output perturbation of evicting key i by its attention weight
    times ||v_i W_o||_1, the value projected by the layer's output projection (per query
    head, then averaged over the GQA group). Scorers see tensors, not model weights, so
    this is the projection-free ||v_i||_1; the W_o projection is a refinement a pure-tensor
    scorer does not have. Values are shared by a GQA group, so no group reduction is needed.
    """
    return x.values.float().abs().sum(dim=-1)


@dataclass(frozen=True)
class CriticalKVScorer:
    """A key is critical by its attention times the size of its contribution to the output:
    score = (SnapKV score + `epsilon`) * ||v||_1 (see value_norms). The attention part is
    SnapKV itself, with SnapKV's options (`kernel`, `pool`, `group_reduce`, `pool_order`;
    make_policy gives ada- names Ada-KV's GQA order, as for SnapKV), so a key with moderate
    attention and a large value outranks one with slightly more attention and a tiny value.
    `epsilon` (1e-4, as the authors' code) lets keys no window query attends to still rank
    by their values; padding, and keys a sliding window hides, score 0.

    Differs from the paper: its selection has two stages, the first spending half of each
    head's budget on the top keys by attention alone, the second filling the rest by
    attention x projected value norm. A scorer does not know the budget, so only the
    second stage's score is implemented, over all keys; and the norm is ||v||_1, not
    ||v W_o||_1 (value_norms).
    """

    kernel: int = 5
    pool: str = "avg"
    group_reduce: str = "mean"
    pool_order: str = "pool-then-reduce"
    epsilon: float = 1e-4
    name: str = "criticalkv"
    observes_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.epsilon < 0:
            raise ValueError(f"CriticalKV epsilon must be >= 0, got {self.epsilon}")
        _ = self.attention  # SnapKV validates the pooling options now, not at the first prefill

    @cached_property
    def attention(self) -> SnapKVScorer:
        """The attention part of the score: SnapKV with this scorer's options."""
        return SnapKVScorer(
            kernel=self.kernel, pool=self.pool, group_reduce=self.group_reduce, pool_order=self.pool_order
        )

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        return (self.attention(x) + self.epsilon) * value_norms(x) * x.visible()[:, None, :]
