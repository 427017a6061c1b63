"""CrossLayerPrefill: the layers of one cache wait for each other's prefill, so that a
cross-layer policy (KV-Compress, arXiv 2410.00161) ranks them all at once.

A layer attends its prefill densely whatever the policy, so nothing it returns depends
on when it is compressed: each layer hands its dense prefill and scores here, and the
last model layer's arrival compresses every layer together. A layer that stores
nothing of its own (SwiftKV's AcrossKV) may be last: then the first later use of any
waiting layer (a decode step, a byte count) compresses them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvsqueeze.policy import Policy, ScoreInput

if TYPE_CHECKING:
    from kvsqueeze.cache.layer import CompressedLayer


class CrossLayerPrefill:
    """Holds the dense prefills of the layers of one cache until they are compressed."""

    def __init__(self, policy: Policy, num_layers: int) -> None:
        self.policy, self.num_layers = policy, num_layers
        self.waiting: dict[int, tuple[CompressedLayer, ScoreInput, torch.Tensor]] = {}

    def add(self, layer: CompressedLayer, x: ScoreInput, scores: torch.Tensor) -> None:
        """Keep `layer`'s prefill `x` and its scores; compress all once the last layer's arrives."""
        self.waiting[layer.layer_idx] = (layer, x, scores)
        if layer.layer_idx == self.num_layers - 1:
            self.flush()

    def discard(self, layer_idx: int) -> None:
        """Forget a layer's waiting prefill (the layer was reset)."""
        self.waiting.pop(layer_idx, None)

    def flush(self) -> None:
        """Compress every waiting layer by one ranking over all of them."""
        if not self.waiting:
            return
        waiting, self.waiting = self.waiting, {}
        prefills = {i: x for i, (_, x, _) in waiting.items()}
        keep = self.policy.keep_masks(prefills, self.num_layers, {i: s for i, (_, _, s) in waiting.items()})
        for i, (layer, x, _) in waiting.items():
            layer.store_prefill(x, keep[i])
