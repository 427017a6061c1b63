"""Timing one policy on one batch: prefill seconds, decode ms per step, bytes kept.

Decode runs a fixed number of steps (no early stop at EOS), so every policy does the
same work; what differs is only the cache it reads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.policy import Policy


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


def measure(model: PreTrainedModel, input_ids: torch.Tensor, policy: Policy, new_tokens: int) -> BenchRow:
    """Prefill `input_ids` [batch, tokens] with `policy`, then decode `new_tokens` greedy steps."""
    device = input_ids.device
    cache = KVSqueezeCache(model, policy)
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
    return BenchRow(
        policy=policy.name,
        prefill_seconds=prefill,
        decode_ms_per_step=step * 1e3,
        decode_tokens_per_second=input_ids.shape[0] / step if step > 0 else 0.0,
        kv_bytes_stored=cache.nbytes,
        kv_bytes_full=cache.full_nbytes,
    )
