"""KVSqueezeCache: a transformers `Cache` over kvsqueeze's compressed layers.

This is a thin adapter: each cache layer wraps a `CompressedLayer` (cache/layer.py),
which scores, evicts, stores and attends without knowing transformers. What the
adapter adds is the handshake with transformers' attention call: `update` cannot
store yet (scoring needs the queries), so it hands a `PendingStep` to the registered
"kvsqueeze" attention function (hf/attention.py), which passes the queries back.

The model must run with that attention while it uses the cache: `with cache:` (or
`with use_kvsqueeze_attention(model):`) switches it and restores the model's own
attention on exit. A forward through the cache without it raises a clear error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsqueeze.cache import CompressedLayer, CrossLayerPrefill, LayerMark, PrefillCallback
from kvsqueeze.ops import dense_causal_attention
from kvsqueeze.ops.cpu_quantize import CpuKVQuantizer
from kvsqueeze.policy import Policy
from kvsqueeze.store.quantized_kv import KVQuantConfig

ATTENTION_NAME = "kvsqueeze"


@contextmanager
def use_kvsqueeze_attention(model: PreTrainedModel, attention: str = ATTENTION_NAME) -> Iterator[PreTrainedModel]:
    """Run `model` with the "kvsqueeze" attention (or another registered `attention`, such
    as hf/kvzip.py's capturing one) inside the block; restore its own after."""
    previous = model.config._attn_implementation
    if previous != attention:
        model.set_attn_implementation(attention)
    try:
        yield model
    finally:
        if previous != attention:
            model.set_attn_implementation(previous)


@dataclass
class PendingStep:
    """What `update` hands to the attention function in place of key/value tensors:
    this forward's new keys/values and the layer that will store them."""

    layer: KVSqueezeLayer
    keys: torch.Tensor
    values: torch.Tensor
    # True for a layer that reads another layer's entry (SwiftKV's AcrossKV): that layer
    # stored these keys/values in this forward already, so this one only attends.
    shared: bool = False

    def __getattr__(self, name: str):
        # Only another attention function would ask a PendingStep for tensor attributes.
        raise RuntimeError(
            "KVSqueezeCache needs the model to run with the 'kvsqueeze' attention: call generate() "
            "inside `with cache:` (or `with kvsqueeze.hf.use_kvsqueeze_attention(model):`)"
        )


class KVSqueezeLayer(CacheLayerMixin):
    """One layer of the cache, as transformers sees it; `compressed` does the work."""

    is_compileable = False
    is_sliding = False

    def __init__(self, compressed: CompressedLayer) -> None:
        super().__init__()
        self.compressed = compressed

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
        return self.compressed.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.compressed.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.compressed.reset()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVSqueezeCache does not support beam search; use greedy or sampling")

    def attend(
        self,
        query: torch.Tensor,
        step: PendingStep,
        padding_mask: torch.Tensor | None,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Store this forward's keys/values and return attention [b, q_heads, q, d].
        `padding_mask` is None when nothing in the batch is padded (decided once per
        forward by the mask function), so no layer checks it again."""
        # The chunk's slots are its keys' (SwiftKV's upper layers have queries for the last ones only).
        t = step.keys.shape[2]
        chunk_valid = None if padding_mask is None else padding_mask[:, -t:].to(torch.bool)
        if not step.shared:
            return self.compressed.forward(query, step.keys, step.values, chunk_valid, scaling, sliding_window)
        seen = self.compressed.seen
        if seen == t:  # this forward was the prefill: attend densely, as the storing layer did before compressing
            return dense_causal_attention(query, step.keys, step.values, chunk_valid, scaling, sliding_window)
        positions = torch.arange(seen - query.shape[2], seen, device=query.device)
        return self.compressed.read(query, positions, scaling, sliding_window)


def _text_config(model_or_config: PreTrainedModel | PreTrainedConfig) -> PreTrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config()


class KVSqueezeCache(Cache):
    """A compressed KV cache for `model.generate(..., past_key_values=cache)`.

    Use it inside `with cache:` (the model given here then runs with the "kvsqueeze"
    attention, which lets the cache see the queries it scores with) or inside
    `with use_kvsqueeze_attention(model):`. `on_prefill(layer_idx, prefill)` is called
    with every layer's dense prefill before it is compressed (hf/prefill.py records it).
    `kv_bits` 8, 4 or 2 stores the kept entries KIVI-quantized in groups of `kv_group`
    (the whole prefill; the `kv_residual` newest decoded entries of each head stay in
    full precision until a group fills: store/quantized_kv.py);
    `kv_key_axis="token"` is the naive per-token baseline. 16 stores them unquantized.
    """

    @classmethod
    def storing(cls, model: PreTrainedModel | PreTrainedConfig, policy: Policy, quant: KVQuantConfig) -> KVSqueezeCache:
        """A cache whose kept entries are stored as `quant` says."""
        return cls(
            model, policy, kv_bits=quant.bits, kv_group=quant.group, kv_residual=quant.residual,
            kv_key_axis=quant.key_axis,
        )  # fmt: skip

    def __init__(
        self,
        model: PreTrainedModel | PreTrainedConfig,
        policy: Policy,
        on_prefill: PrefillCallback | None = None,
        *,
        kv_bits: int = 16,
        kv_group: int = 32,
        kv_residual: int = 128,
        kv_key_axis: str = "channel",
    ) -> None:
        self.num_layers = _text_config(model).num_hidden_layers
        self.quant = KVQuantConfig(kv_bits, kv_group, kv_residual, kv_key_axis)
        make_store = self.quant.store_factory(CpuKVQuantizer)
        # A cross-layer policy compresses all layers together, once the last one has its prefill.
        self.cross_layer = CrossLayerPrefill(policy, self.num_layers) if policy.across_layers else None
        layers = [
            KVSqueezeLayer(CompressedLayer(policy, i, self.num_layers, make_store, on_prefill, self.cross_layer))
            for i in range(self.num_layers)
        ]
        super().__init__(layers=layers)
        self.policy = policy
        self.model = model if isinstance(model, PreTrainedModel) else None
        self._scopes: list = []

    def __enter__(self) -> KVSqueezeCache:
        if self.model is None:
            raise TypeError("`with cache:` needs the cache built from a model, not a config")
        scope = use_kvsqueeze_attention(self.model)
        scope.__enter__()
        self._scopes.append(scope)
        return self

    def __exit__(self, *exc) -> None:
        self._scopes.pop().__exit__(*exc)

    def _filled(self) -> list[CompressedLayer]:
        if self.cross_layer is not None:
            self.cross_layer.flush()
        return [layer.compressed for layer in self.layers if layer.compressed.store is not None]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds now, from its tensors."""
        return sum(layer.nbytes for layer in self._filled())

    @property
    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache would hold for the same (unpadded) tokens."""
        return sum(layer.full_nbytes for layer in self._filled())

    def reserve(self, n: int) -> None:
        """Make room for n more tokens in every head now, so decoding never regrows a layer."""
        for layer in self._filled():
            layer.store.reserve(n)

    def trim(self) -> None:
        """Give back room no token uses (see KVStore.trim): nbytes is then the kept tokens'."""
        for layer in self._filled():
            layer.store.trim()

    def mark(self) -> list[LayerMark]:
        """The cache as it is now, for rollback(): every layer's logical length and
        per-head lengths."""
        return [layer.compressed.mark() for layer in self.layers]

    def rollback(self, mark: list[LayerMark]) -> None:
        """Forget the tokens fed since mark() gave `mark`: every layer drops the entries
        they appended to its heads and their count, so the cache answers, and positions
        the next tokens, as a copy taken at the mark would (far cheaper than the copy).
        A quantized cache refuses once those tokens filled a residual group (see
        rollback_room())."""
        if len(mark) != len(self.layers):
            raise ValueError(f"a mark of {len(mark)} layers cannot roll back a cache of {len(self.layers)}")
        for layer, layer_mark in zip(self.layers, mark, strict=True):  # every layer first: all or nothing
            layer.compressed.check_rollback(layer_mark)
        for layer, layer_mark in zip(self.layers, mark, strict=True):
            layer.compressed.rollback(layer_mark)

    def rollback_room(self) -> int | None:
        """How many tokens may be fed from now on and still be undone by rollback(mark());
        None: any number (an unquantized cache)."""
        rooms = [layer.compressed.rollback_room() for layer in self.layers]
        return min((r for r in rooms if r is not None), default=None)

    def stored_tokens(self) -> int:
        """Physical length: live entries over all layers, sequences and heads."""
        return sum(layer.store.num_tokens for layer in self._filled())

    def kept_tokens_per_head(self, sequence: int = 0) -> list[list[int]]:
        """Tokens each kv-head kept right after prefill, per layer, for one sequence."""
        return [layer.kept_after_prefill[sequence].tolist() for layer in self._filled()]
