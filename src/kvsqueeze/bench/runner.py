"""Timing one policy on one batch: prefill seconds, decode ms per step, bytes kept,
peak memory, and how far a decode step is from the memory-bandwidth bound.

Decode runs a fixed number of steps (no early stop at EOS), so every policy does the
same work; what differs is only the cache it reads. The bound of a step is the time
to read the weights once plus the KV the step reads, at the measured bandwidth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from kvsqueeze.bench.bandwidth import measure_bandwidth
from kvsqueeze.bench.memory import PeakMemory
from kvsqueeze.data.haystack import essays_text
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.models import load_model, max_context
from kvsqueeze.policy import Policy, make_policy
from kvsqueeze.store.quantized_kv import KVQuantConfig

# Sequences of a batch start this many tokens apart in the essays, so they differ.
SEQUENCE_STRIDE = 97


@dataclass
class BenchRow:
    policy: str
    prefill_seconds: float
    decode_ms_per_step: float
    decode_tokens_per_second: float
    kv_bytes_stored: int
    kv_bytes_full: int
    peak_memory_bytes: int = 0
    bound_ms_per_step: float = 0.0
    ratio_to_bound: float = 0.0

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
    The model must already run with the attention implementation the cache needs
    (for our cache: inside `with cache:`)."""
    device = input_ids.device
    with torch.inference_mode(), PeakMemory(device) as peak:
        _sync(device)
        start = time.perf_counter()
        logits = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
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
        peak_memory_bytes=peak.bytes,
    )


def weight_bytes_read_per_step(model: PreTrainedModel) -> int:
    """Bytes of weights a decode step reads: every parameter once, except an untied
    input embedding, of which a step reads only a few rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        total -= embed.numel() * embed.element_size()
    return total


def add_bound(row: BenchRow, weight_bytes: int, bandwidth: float) -> BenchRow:
    """Fill the bound columns: a step reads the weights and the stored KV once."""
    row.bound_ms_per_step = (weight_bytes + row.kv_bytes_stored) / bandwidth * 1e3
    row.ratio_to_bound = row.decode_ms_per_step / row.bound_ms_per_step
    return row


def bench_inputs(tokenizer: PreTrainedTokenizerBase, context: int, batch: int, device: str) -> torch.Tensor:
    """Essay text (so a real model's attention looks like real attention), each
    sequence of the batch starting elsewhere in the essays, so they differ."""
    ids = tokenizer(essays_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < context + batch * SEQUENCE_STRIDE:
        raise KVSqueezeError(f"context {context} is longer than the {len(ids)}-token essays used as input")
    starts = [i * SEQUENCE_STRIDE for i in range(batch)]
    return torch.tensor([ids[s : s + context] for s in starts], device=device)


def run_bench(
    model_name: str,
    policies: list[str],
    keep: float | None,
    tokens: int | None,
    context: int,
    batch: int,
    new_tokens: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    each: Callable[[list[Policy]], Iterable[Policy]] = iter,
    quants: tuple[KVQuantConfig, ...] = (KVQuantConfig(),),
    pooling: dict | None = None,
) -> list[BenchRow]:
    """One BenchRow per policy and KV storage (`quants`: 16 bits, or KIVI-quantized),
    with bound columns from a bandwidth measured here. `each` walks the policies (the
    command line passes a progress bar). `pooling` holds make_policy's pooling, kernel and
    ada_pool_kernel settings (None: their defaults)."""
    if context < 1 or batch < 1 or new_tokens < 1:
        raise KVSqueezeError("context, batch and new-tokens must all be at least 1")
    if not policies or not quants:
        raise KVSqueezeError("no policies or no kv bits given")
    # Built (so validated) before the model loads.
    built = [make_policy(name, keep=keep, tokens=tokens, **(pooling or {})) for name in policies]
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    if context + new_tokens > max_context(model):
        raise KVSqueezeError(
            f"context {context} + {new_tokens} new tokens exceeds the model's context of {max_context(model)}"
        )
    input_ids = bench_inputs(tokenizer, context, batch, device)
    bandwidth = measure_bandwidth(device)
    weights = weight_bytes_read_per_step(model)
    # Warm-up: first calls pay for lazy initialisation and allocator growth.
    with KVSqueezeCache(model, built[0]) as cache:
        measure(model, input_ids[:, : min(context, 256)], cache, 2, "warm-up")
    rows = []
    for policy in each(built):
        for quant in quants:
            label = f"{policy.name} {quant.describe()}" if quant.quantizes else policy.name
            kv = dict(kv_bits=quant.bits, kv_group=quant.group, kv_residual=quant.residual, kv_key_axis=quant.key_axis)
            with KVSqueezeCache(model, policy, **kv) as cache:
                row = measure(model, input_ids, cache, new_tokens, label)
            rows.append(add_bound(row, weights, bandwidth))
    return rows
