"""Cross-layer compression in the engine: Rehg, "KV-Compress: Paged KV-Cache Compression
with Variable Compression Rates per Attention Head", arXiv 2410.00161.

A cross-layer policy ranks every layer and head of a sequence at once, so no layer can
evict before the last one has run its prompt. The cache hands each layer's prefill here
as the layer finishes; the prompt stays uncompressed in every store (the footprint that
admission reserved for it) until the last cache entry arrives, in the same step, and
then every layer evicts what the one ranking left it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvsqueeze.policy import Policy, ScoreInput

Apply = Callable[[torch.Tensor], object]  # keep[kv_heads, tokens] -> evict (or quantize) a store


@dataclass
class _Waiting:
    policy: Policy
    prefills: dict[int, ScoreInput] = field(default_factory=dict)
    scores: dict[int, torch.Tensor | None] = field(default_factory=dict)
    apply: dict[int, Apply] = field(default_factory=dict)


class CrossLayerCompression:
    """Collects one sequence's per-layer prefills until all `num_entries` cache entries
    have theirs, then allocates over all of them and evicts."""

    def __init__(self, num_entries: int, num_layers: int) -> None:
        self.num_entries, self.num_layers = num_entries, num_layers
        self._waiting: dict[int, _Waiting] = {}

    def add(
        self, seq_id: int, policy: Policy, layer_idx: int, x: ScoreInput, scores: torch.Tensor | None, apply: Apply
    ) -> bool:
        """Hand in one layer's prefill (batch of one) and how to cut its store; returns
        True when this was the last layer and every layer has been cut."""
        waiting = self._waiting.setdefault(seq_id, _Waiting(policy))
        waiting.prefills[layer_idx], waiting.scores[layer_idx], waiting.apply[layer_idx] = x, scores, apply
        if len(waiting.prefills) < self.num_entries:
            return False
        del self._waiting[seq_id]
        scores = {i: s for i, s in waiting.scores.items() if s is not None}
        for i, keep in policy.keep_masks(waiting.prefills, self.num_layers, scores).items():
            waiting.apply[i](keep[0])
        return True

    def forget(self, seq_id: int) -> None:
        """A sequence freed mid-prefill (preempted or aborted) leaves nothing waiting."""
        self._waiting.pop(seq_id, None)

    def __len__(self) -> int:
        return len(self._waiting)
