"""Expected Attention: Devoto, Jeblick and Jégou, "Expected Attention: KV Cache
Compression by Estimating Attention from Future Queries Distribution", arXiv 2510.00636
(kvpress's ExpectedAttentionPress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput


@dataclass(frozen=True)
class ExpectedAttentionScorer:
    """Keys scored by the attention future queries are expected to pay them, in closed
    form, with no attention matrix formed.

    Future queries of a head are modelled as a Gaussian whose mean mu and covariance
    S are those of the last `recent` real prompt queries. For q ~ N(mu, S),
    E[exp(s q.k)] = exp(s mu.k + s^2/2 k'Sk) (s the softmax scale), so key k's expected
    logit is s mu.k + s^2/2 k'Sk; a softmax over the keys the last query sees turns
    those into expected attention, averaged over the GQA group and multiplied by the
    value's L2 norm (`value_norm`, the paper's default: what a key adds to the output
    scales with its value).

    Differs from kvpress: kvpress takes the statistics of all prompt queries before
    RoPE and rotates them by RoPE averaged over the next 512 positions; scorers here
    see queries after RoPE and know nothing of the model's RoPE, so the statistics
    come from the recent queries, already rotated to positions next to the future
    ones (their spread over `recent` positions plays the part of the averaged rotation).
    """

    recent: int = 128
    value_norm: bool = True
    name: str = "expected-attention"
    observes_queries: ClassVar[bool] = False  # it reads recent queries but needs no window

    def __post_init__(self) -> None:
        if self.recent < 2:
            raise ValueError(f"expected attention needs at least 2 recent queries for a covariance, got {self.recent}")

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        b, hq, t, d = x.queries.shape
        hkv, g = x.keys.shape[1], x.group_size
        n = min(self.recent, t)
        q = x.queries[:, :, t - n :].float().view(b, hkv, g, n, d)
        real = x.valid[:, t - n :].float().view(b, 1, 1, n, 1)
        count = real.sum(dim=3, keepdim=True).clamp_min(1)
        mu = (q * real).sum(dim=3, keepdim=True) / count  # [b, hkv, g, 1, d]
        keys = x.keys.float()[:, :, None]  # [b, hkv, 1, t, d]
        mean_logit = (mu @ keys.transpose(-1, -2)).squeeze(3)  # [b, hkv, g, t]
        # k'Sk = mean over recent queries of ((q - mu).k)^2, without forming S.
        spread = ((q - mu) * real) @ keys.transpose(-1, -2)  # [b, hkv, g, n, t]
        variance = spread.square().sum(dim=3) / count.squeeze(3)
        logits = x.scaling * mean_logit + 0.5 * x.scaling**2 * variance
        logits = logits.masked_fill(~x.visible()[:, None, None, :], float("-inf"))
        scores = torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=2)
        return scores * x.values.float().norm(dim=-1) if self.value_norm else scores
