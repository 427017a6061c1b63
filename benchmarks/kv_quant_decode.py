"""Decode step over a 16-bit cache and over KIVI-quantized caches at a long context,
the steps alternated in one process so that a shared machine's drift hits every cache
alike (issue 13's speed target: int4 no slower than bf16 at batch 16 x 8k).

    python benchmarks/kv_quant_decode.py [--context 8192] [--batch 16] [--bits 16,4]
                                         [--kv-group 32] [--steps 6]

The caches are filled with random keys and values of the model's shapes through the
`full` policy's prefill path (what a compressed prompt would store; decode speed does
not depend on the values), so no 8k prefill has to run. Each step feeds one token per
sequence through the real model (HF path, kvsqueeze attention). Prints, per storage,
the bytes held, min and median ms per step, and the ratio to the first storage.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.cache import use_kvsqueeze_attention
from kvsqueeze.hf.models import load_model
from kvsqueeze.policy import ScoreInput, make_policy
from kvsqueeze.store.quantized_kv import KVQuantConfig


def filled_cache(model, context: int, batch: int, quant: KVQuantConfig, seed: int = 0) -> KVSqueezeCache:
    """A cache holding `context` random entries per head and layer, stored as `quant` says."""
    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    cache = KVSqueezeCache.storing(model, make_policy("full"), quant)
    valid = torch.ones(batch, context, dtype=torch.bool)
    queries = torch.zeros(batch, cfg.num_attention_heads, context, d, dtype=model.dtype)
    for layer in cache.layers:
        keys = torch.randn(batch, hkv, context, d, generator=gen).to(model.dtype)
        values = torch.randn(batch, hkv, context, d, generator=gen).to(model.dtype)
        layer.lazy_initialization(keys, values)
        layer.compressed.prefill(ScoreInput(queries, keys, values, valid, d**-0.5), None)
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bits", default="16,4", help="comma-separated: 16, 8, 4, 2")
    parser.add_argument("--kv-group", type=int, default=32)
    parser.add_argument("--kv-residual", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per storage (after one warm-up)")
    args = parser.parse_args()

    model, _ = load_model(args.model, torch.bfloat16, "cpu")
    storages = [KVQuantConfig(int(b), args.kv_group, args.kv_residual) for b in args.bits.split(",")]
    caches = [filled_cache(model, args.context, args.batch, q) for q in storages]
    token = torch.full((args.batch, 1), 42, dtype=torch.long)
    times: list[list[float]] = [[] for _ in caches]
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        for step in track(range(args.steps + 1), description="decode steps"):
            for i, cache in enumerate(caches):
                position = torch.full((args.batch, 1), args.context + step, dtype=torch.long)
                start = time.perf_counter()
                model(token, past_key_values=cache, position_ids=position, use_cache=True)
                if step:  # the first step of each cache warms up
                    times[i].append(time.perf_counter() - start)

    table = Table(title=f"decode, batch {args.batch} x {args.context} context, bf16, {args.steps} steps each")
    for column in ("storage", "KV bytes", "min ms/step", "median ms/step", "median vs first"):
        table.add_column(column, justify="right")
    base = statistics.median(times[0])
    for quant, cache, t in zip(storages, caches, times, strict=True):
        name = "16-bit" if quant.bits == 16 else f"int{quant.bits} G={quant.group} R={quant.residual}"
        median = statistics.median(t)
        table.add_row(name, f"{cache.nbytes / 2**20:.0f} MiB", f"{min(t) * 1e3:.0f}", f"{median * 1e3:.0f}",
                      f"{median / base:.2f}x")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
