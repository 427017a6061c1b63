"""What quantizing the kept K/V adds to a prefill (issue 13's target: under 5%).

    python benchmarks/kv_quant_prefill.py [--context 2048] [--batch 4] [--bits 16,8,4,2]
                                          [--policies full,ada-snapkv] [--keep 0.25] [--repeats 3]

Two measurements, each alternating the storages in one process so that a shared
machine's drift hits them alike:
- end to end: the model's forward over real essay tokens into a fresh KVSqueezeCache
  of each policy and storage (prefill, scoring, compression, quantization), min and
  median of `repeats` after a warm-up round;
- isolated: one recorded prefill (hf/prefill.py) compressed into each storage
  (scoring, eviction, quantization, no forward), min of `repeats`: the quantization's
  own cost, free of the forward's noise, as a share of the end-to-end 16-bit prefill
  (its median: one lucky run would inflate the share).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table

from kvsqueeze.bench.runner import bench_inputs
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.models import load_model
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.policy import make_policy
from kvsqueeze.store.quantized_kv import KVQuantConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bits", default="16,8,4,2", help="comma-separated, 16 first")
    parser.add_argument("--kv-group", type=int, default=32)
    parser.add_argument("--policies", default="full,ada-snapkv")
    parser.add_argument("--keep", type=float, default=0.25, help="keep ratio of the compressing policies")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, torch.bfloat16, "cpu")
    ids = bench_inputs(tokenizer, args.context, args.batch, "cpu")
    storages = [KVQuantConfig(int(b), args.kv_group) for b in args.bits.split(",")]
    policies = [make_policy(name, keep=args.keep) for name in args.policies.split(",")]
    cases = [(p, q) for p in policies for q in storages]

    forward: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    build: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    with torch.inference_mode():
        for repeat in track(range(args.repeats + 1), description="prefills"):
            for i, (policy, quant) in enumerate(cases):
                cache = KVSqueezeCache.storing(model, policy, quant)
                start = time.perf_counter()
                with cache:
                    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                if repeat:  # the first round warms up
                    forward[i].append(time.perf_counter() - start)
        record = record_prefill(model, ids)
        for _ in range(args.repeats):
            for i, (policy, quant) in enumerate(cases):
                start = time.perf_counter()
                record.cache(model, policy, quant)
                build[i].append(time.perf_counter() - start)

    title = f"prefill, batch {args.batch} x {args.context} tokens, bf16, {args.repeats} repeats, keep {args.keep}"
    table = Table(title=title)
    columns = ("policy", "storage", "prefill min s", "prefill median s", "median vs 16-bit",
               "build min s", "quantizing / 16-bit prefill")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for i, (policy, quant) in enumerate(cases):
        base = cases.index((policy, storages[0]))
        median, base_median = statistics.median(forward[i]), statistics.median(forward[base])
        extra = min(build[i]) - min(build[base])
        table.add_row(policy.name, "16-bit" if quant.bits == 16 else f"int{quant.bits} G={quant.group}",
                      f"{min(forward[i]):.3f}", f"{median:.3f}", f"{median / base_median - 1:+.1%}",
                      f"{min(build[i]):.3f}", f"{extra / base_median:+.1%}")  # fmt: skip
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
