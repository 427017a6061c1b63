"""One dense prefill, compressed by many policies.

Prefill attention is dense whatever the policy: compression only decides what later
tokens see. So the queries, keys and values of one prefill are all any policy needs,
and a sweep can run the model over a prompt once, then build a compressed cache per
policy and budget from the record. The caches are the ones a fresh run would build
(tests/test_prefill_record.py checks that), and each scorer runs once per prompt, whatever
the number of budgets.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from transformers import PreTrainedModel

from kvsqueeze.hf.cache import KVSqueezeCache
from kvsqueeze.ops import policy_scores
from kvsqueeze.policy import Policy, ScoreInput, make_policy
from kvsqueeze.store.quantized_kv import KVQuantConfig


@dataclasses.dataclass
class PrefillRecord:
    """The dense prefill of one batch of prompts."""

    # per layer: queries, keys, values, real-token mask; None for a layer that stores
    # nothing of its own (a SwiftKV AcrossKV layer reads its group's first layer's entry)
    layers: list[ScoreInput | None]
    last_logits: torch.Tensor  # [batch, vocab]: the next-token logits after the prompt
    seconds: float  # wall time of the model forward
    _scores: dict = dataclasses.field(default_factory=dict, repr=False)

    def cache(self, model: PreTrainedModel, policy: Policy, quant: KVQuantConfig | None = None) -> KVSqueezeCache:
        """A cache holding this prompt compressed by `policy`, ready to decode; `quant`
        says how it stores the kept entries (None: unquantized)."""
        cache = KVSqueezeCache.storing(model, policy, quant or KVQuantConfig())
        for layer, prefill in zip(cache.layers, self.layers, strict=True):
            if prefill is None:
                continue
            x = dataclasses.replace(prefill, window=policy.window)
            layer.lazy_initialization(x.keys, x.values)
            layer.compressed.prefill(x, self._layer_scores(layer.compressed.layer_idx, policy, x))
        return cache

    def _layer_scores(self, layer_idx: int, policy: Policy, x: ScoreInput) -> torch.Tensor | None:
        if not policy.compresses:
            return None
        key = (layer_idx, policy.scorer, policy.window)
        if key not in self._scores:
            self._scores[key] = policy_scores(policy.scorer, x)
        return self._scores[key]


def record_prefill(model: PreTrainedModel, input_ids: torch.Tensor) -> PrefillRecord:
    """Run the model once over `input_ids` [batch, tokens] and keep every layer's
    dense prefill."""
    recorded: dict[int, ScoreInput] = {}
    recording = KVSqueezeCache(model, make_policy("full"), on_prefill=recorded.__setitem__)
    with torch.inference_mode(), recording:
        start = time.perf_counter()
        logits = model(input_ids, past_key_values=recording, use_cache=True, logits_to_keep=1).logits
        seconds = time.perf_counter() - start
    layers = [recorded.get(i) for i in range(recording.num_layers)]
    return PrefillRecord(layers=layers, last_logits=logits[:, -1].float(), seconds=seconds)
