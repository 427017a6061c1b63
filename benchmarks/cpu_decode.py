"""CPU decode speed and prefill cost of every policy at a long context.

    python benchmarks/cpu_decode.py [--model smollm2-135m] [--context 4000] [--keep 0.25]
                                    [--new-tokens 32] [--policies full,snapkv,...]

Rows: plain transformers (DynamicCache + sdpa) as the baseline, then kvsqueeze with
each policy. Columns: prefill seconds (best of --repeats), its overhead over our `full`
prefill (the cost of scoring), decode ms per step, KV bytes stored and kept fraction.
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.progress import track
from rich.table import Table
from transformers import DynamicCache

from kvsqueeze.bench.runner import BenchRow, bench_inputs, measure
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.models import load_model
from kvsqueeze.policy import make_policy, policy_names


def best_of(repeats: int, run) -> BenchRow:
    """The run with the fastest prefill and, separately, the fastest decode."""
    rows = [run() for _ in range(repeats)]
    best = min(rows, key=lambda r: r.decode_ms_per_step)
    best.prefill_seconds = min(r.prefill_seconds for r in rows)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=4000)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", default=",".join(policy_names()))
    args = parser.parse_args()

    model, tokenizer = load_model(args.model)
    input_ids = bench_inputs(tokenizer, args.context, 1, "cpu")

    def baseline() -> BenchRow:
        return measure(model, input_ids, DynamicCache(config=model.config), args.new_tokens, "transformers (sdpa)")

    def ours(name: str):
        policy = make_policy(name, keep=args.keep)

        def run() -> BenchRow:
            with KVSqueezeCache(model, policy) as cache:
                return measure(model, input_ids, cache, args.new_tokens, name)

        return run

    rows = [best_of(args.repeats, baseline)]
    for name in track(args.policies.split(","), description="policies"):
        rows.append(best_of(args.repeats, ours(name)))

    ours_full = next((r for r in rows if r.policy == "full"), rows[0])
    base = rows[0]
    table = Table(
        title=f"{args.model}, CPU ({torch.get_num_threads()} threads), context {args.context}, keep {args.keep}, "
        f"{args.new_tokens} decode steps, best of {args.repeats}"
    )
    for col in ("policy", "prefill s", "vs full prefill", "decode ms/step", "vs transformers", "KV MiB", "kept"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.policy,
            f"{r.prefill_seconds:.2f}",
            f"{r.prefill_seconds / ours_full.prefill_seconds - 1:+.1%}",
            f"{r.decode_ms_per_step:.1f}",
            f"{base.decode_ms_per_step / r.decode_ms_per_step:.2f}x",
            f"{r.kv_bytes_stored / 2**20:.1f}",
            f"{r.kv_bytes_stored / r.kv_bytes_full:.1%}",
        )
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
