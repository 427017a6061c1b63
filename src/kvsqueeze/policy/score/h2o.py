"""H2O / observed attention: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models", arXiv 2306.14048."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput, attention_probs, reduce_group


def observers(x: ScoreInput) -> torch.Tensor:
    """[batch, tokens]: how many real prompt queries see each key (0 for padding keys).
    Query q sees key k when k <= q and, with a sliding window, q - k < sliding_window."""
    t = x.valid.shape[-1]
    reach = t if x.sliding_window is None else min(t, x.sliding_window)
    seen_by = torch.cumsum(x.valid.long(), dim=-1)  # real queries in slots [0, q]
    slot = torch.arange(t, device=x.valid.device)
    last = seen_by[:, (slot + reach - 1).clamp_max(t - 1)]  # real queries up to the key's last observer
    before = torch.nn.functional.pad(seen_by, (1, 0))[:, :t]  # real queries before the key
    return (last - before) * x.valid


@dataclass(frozen=True)
class H2OScorer:
    """One-shot H2O as kvpress's ObservedAttentionPress: the attention mass each key
    receives from all prompt queries, divided by the number of queries that saw it,
    scored once after prefill, not re-scored while decoding.

    Why divide: a key at position i is seen by n - i queries, so the plain sum favours
    early tokens and loses a late needle even at keep 0.5; the mean is what each
    observer gave it. It needs the full prompt x prompt attention, so queries are
    processed in chunks to bound memory, one query head at a time: on CPU a head's
    chunk of probabilities stays in cache from the logits to the sum (twice as fast as
    all heads at once at 2-4k tokens, with the same sums).
    """

    chunk: int = 512
    group_reduce: str = "mean"
    name: str = "h2o"
    observes_queries: ClassVar[bool] = True

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        b, hkv, t, _ = x.keys.shape
        g = x.group_size
        total = x.keys.new_zeros(b, hkv, g, t, dtype=torch.float32)
        for start in range(0, t, self.chunk):
            end = min(start + self.chunk, t)
            for head in range(hkv * g):
                kv = head // g
                # The chunk's queries see no key from `end` on (causal): leaving those keys out
                # of its logits and softmax saves about half the work over the whole prompt.
                seen = dataclasses.replace(
                    x,
                    queries=x.queries[:, head : head + 1, :end],
                    keys=x.keys[:, kv : kv + 1, :end],
                    values=x.values[:, kv : kv + 1, :end],
                    valid=x.valid[:, :end],
                )
                total[:, kv, head % g, :end] += attention_probs(seen, start, end)[:, 0, 0].sum(dim=1)
        mean = total / observers(x).clamp_min(1)[:, None, None, :]
        return reduce_group(mean, self.group_reduce)
