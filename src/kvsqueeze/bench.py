"""Timing one policy on one batch: prefill seconds, decode ms per step, bytes kept.

Decode runs a fixed number of steps (no early stop at EOS), so every policy does the
same work; what differs is only the cache it reads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from kvsqueeze.hf import KVSqueezeCache


@dataclass
class BenchRow:
    policy: str
    prefill_seconds: float
    decode_ms_per_step: float
    decode_tokens_per_second: float
    kv_bytes_stored: int
    kv_bytes_full: int

    def to_json(self) -> dict:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_bytes(cache: Cache) -> tuple[int, int]:
    """(bytes stored, bytes an uncompressed cache would hold) for our cache or a plain
    transformers cache (which stores everything, so the two are equal)."""
    if isinstance(cache, KVSqueezeCache):
        return cache.nbytes, cache.full_nbytes
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held, held


def measure(model: PreTrainedModel, input_ids: torch.Tensor, cache: Cache, new_tokens: int, label: str) -> BenchRow:
    """Prefill `input_ids` [batch, tokens] into `cache`, then decode `new_tokens` greedy steps.
    The model must already run with the attention implementation the cache needs."""
    device = input_ids.device
    with torch.inference_mode():
        _sync(device)
        start = time.perf_counter()
        logits = model(input_ids, past_key_values=cache, use_cache=True).logits
        _sync(device)
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(dim=-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(dim=-1)
        _sync(device)
        decode = time.perf_counter() - start
    step = decode / max(new_tokens, 1)
    stored, full = cache_bytes(cache)
    return BenchRow(
        policy=label,
        prefill_seconds=prefill,
        decode_ms_per_step=step * 1e3,
        decode_tokens_per_second=input_ids.shape[0] / step if step > 0 else 0.0,
        kv_bytes_stored=stored,
        kv_bytes_full=full,
    )
