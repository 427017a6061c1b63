"""KVSqueezeCache: a transformers `Cache` whose layers keep a compressed FlatKV.

The first forward through a layer (the prefill) attends densely, then the policy
picks what each head keeps and only that is stored. Later forwards (decode steps, or
a continued prompt) append to every head and attend over the ragged store. The cache
counts tokens seen (the logical length transformers uses for positions and masks)
apart from tokens stored (the physical length, per head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsqueeze.ops import append_tokens, dense_causal_attention, policy_scores, ragged_attention
from kvsqueeze.policy import Policy, ScoreInput
from kvsqueeze.store import FlatKV

ATTENTION_NAME = "kvsqueeze"


@dataclass
class PendingStep:
    """What `update` hands to the attention function in place of key/value tensors:
    this forward's new keys/values and the layer that will store them. Storing waits
    for the attention function because scoring needs the queries."""

    layer: KVSqueezeLayer
    keys: torch.Tensor
    values: torch.Tensor


class KVSqueezeLayer(CacheLayerMixin):
    """One layer's compressed cache."""

    is_compileable = False
    is_sliding = False

    def __init__(self, policy: Policy, layer_idx: int, num_layers: int) -> None:
        super().__init__()
        self.policy, self.layer_idx, self.num_layers = policy, layer_idx, num_layers
        self.kv: FlatKV | None = None
        self.seen = 0
        self.real_tokens: torch.Tensor | None = None  # [batch] unpadded tokens seen
        self.kept_after_prefill: torch.Tensor | None = None  # [batch, kv_heads]
        self.recorder: list[ScoreInput] | None = None  # set to keep the dense prefill (see hf/prefill.py)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_kv_heads = key_states.shape[:2]
        self.head_dim = key_states.shape[-1]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        step = PendingStep(self, key_states, value_states)
        return step, step

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.kv, self.seen, self.real_tokens, self.kept_after_prefill = None, 0, None, None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVSqueezeCache does not support beam search; use greedy or sampling")

    # ------------------------------------------------------------------ attention
    def attend(
        self,
        query: torch.Tensor,
        step: PendingStep,
        padding_mask: torch.Tensor | None,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Store this forward's keys/values and return attention [b, q_heads, q, d]."""
        b, hq, q_len, d = query.shape
        hkv = step.keys.shape[1]
        chunk_valid = None if padding_mask is None else padding_mask[:, -q_len:].to(torch.bool)
        if chunk_valid is not None and bool(chunk_valid.all()):
            chunk_valid = None
        if self.kv is None:
            out = dense_causal_attention(query, step.keys, step.values, chunk_valid, scaling, sliding_window)
            valid = (
                torch.ones((b, q_len), dtype=torch.bool, device=query.device) if chunk_valid is None else chunk_valid
            )
            prefill = ScoreInput(query, step.keys, step.values, valid, scaling, self.policy.window, sliding_window)
            if self.recorder is not None:
                self.recorder.append(prefill)
            self.store_prefill(prefill)
            return out
        added = torch.full((b,), q_len, device=query.device) if chunk_valid is None else chunk_valid.sum(-1)
        positions = torch.arange(self.seen, self.seen + q_len, device=query.device)
        head_valid = None if chunk_valid is None else chunk_valid.repeat_interleave(hkv, dim=0)
        append_tokens(self.kv, step.keys.flatten(0, 1), step.values.flatten(0, 1), positions, head_valid)
        grouped = query.reshape(b * hkv, hq // hkv, q_len, d)
        out = ragged_attention(grouped, self.kv, positions.expand(b * hkv, q_len), scaling, sliding_window)
        self.real_tokens = self.real_tokens + added
        self.seen += q_len
        return out.view(b, hq, q_len, d)

    def store_prefill(self, x: ScoreInput, scores: torch.Tensor | None = None) -> None:
        """Compress a dense prefill (everything a policy scores: queries, keys, values,
        real-token mask) into this empty layer: keep what the policy picks."""
        if scores is None and self.policy.compresses:
            scores = policy_scores(self.policy.scorer, x)  # fused on GPU for SnapKV
        keep = self.policy.keep_mask(x, self.layer_idx, self.num_layers, scores)
        t = x.keys.shape[2]
        positions = torch.arange(t, device=x.keys.device)
        self.kv = FlatKV.from_dense(x.keys.flatten(0, 1), x.values.flatten(0, 1), keep.flatten(0, 1), positions)
        self.kept_after_prefill = keep.sum(dim=-1)
        self.real_tokens = x.valid.sum(dim=-1)
        self.seen = t


def _text_config(model_or_config: PreTrainedModel | PreTrainedConfig) -> PreTrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config()


class KVSqueezeCache(Cache):
    """A compressed KV cache for `model.generate(..., past_key_values=cache)`.

    Pass the model: the cache switches its attention implementation to "kvsqueeze"
    (registered with transformers by importing kvsqueeze.hf), which is what lets the
    cache see the queries it scores with.
    """

    def __init__(self, model: PreTrainedModel | PreTrainedConfig, policy: Policy) -> None:
        config = _text_config(model)
        self.num_layers = config.num_hidden_layers
        super().__init__(layers=[KVSqueezeLayer(policy, i, self.num_layers) for i in range(self.num_layers)])
        self.policy = policy
        if isinstance(model, PreTrainedModel) and model.config._attn_implementation != ATTENTION_NAME:
            model.set_attn_implementation(ATTENTION_NAME)

    def _filled(self) -> list[KVSqueezeLayer]:
        return [layer for layer in self.layers if layer.kv is not None]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds now, from its tensors."""
        return sum(layer.kv.nbytes for layer in self._filled())

    @property
    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache would hold for the same (unpadded) tokens."""
        total = 0
        for layer in self._filled():
            per_token = 2 * layer.num_kv_heads * layer.head_dim * layer.kv.keys.element_size()
            total += int(layer.real_tokens.sum()) * per_token
        return total

    def stored_tokens(self) -> int:
        """Physical length: live entries over all layers, sequences and heads."""
        return sum(layer.kv.num_tokens for layer in self._filled())

    def kept_tokens_per_head(self, sequence: int = 0) -> list[list[int]]:
        """Tokens each kv-head kept right after prefill, per layer, for one sequence."""
        return [layer.kept_after_prefill[sequence].tolist() for layer in self._filled()]
