"""The SwiftKV model's config: a Llama config plus where SingleInputKV starts and
how many adjacent layers AcrossKV makes share one KV cache entry.

SwiftKV (Qiao et al., arXiv 2410.03960): from layer `swiftkv_kv_layer` (l) on, every
layer's keys and values are projected from layer l's input hidden state; with
AcrossKV, groups of `swiftkv_across_group` adjacent layers from l on share one K/V
(the group's first layer, its "leader", owns the cache entry).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

MODEL_TYPE = "kvsqueeze_swiftkv_llama"


@strict
class SwiftKVLlamaConfig(LlamaConfig):
    """LlamaConfig + `swiftkv_kv_layer` (default L // 2; L means nothing is skipped)
    and `swiftkv_across_group` (1: no sharing)."""

    model_type = MODEL_TYPE

    swiftkv_kv_layer: int | None = None
    swiftkv_across_group: int = 1

    def __post_init__(self, **kwargs) -> None:
        if self.swiftkv_kv_layer is None:
            self.swiftkv_kv_layer = self.num_hidden_layers // 2
        super().__post_init__(**kwargs)

    def validate_architecture(self) -> None:
        super().validate_architecture()
        if not 1 <= self.swiftkv_kv_layer <= self.num_hidden_layers:
            raise ValueError(
                f"swiftkv_kv_layer must be in [1, {self.num_hidden_layers}] (the number of layers), "
                f"got {self.swiftkv_kv_layer}"
            )
        if self.swiftkv_across_group < 1:
            raise ValueError(f"swiftkv_across_group must be >= 1, got {self.swiftkv_across_group}")

    def kv_leader(self, layer: int) -> int:
        """The layer whose cache entry `layer` reads: itself below l, else its AcrossKV group's first layer."""
        if layer < self.swiftkv_kv_layer:
            return layer
        return layer - (layer - self.swiftkv_kv_layer) % self.swiftkv_across_group

    def kv_leaders(self) -> list[int]:
        """Layers >= l that own a cache entry (one per AcrossKV group), in order."""
        return list(range(self.swiftkv_kv_layer, self.num_hidden_layers, self.swiftkv_across_group))
