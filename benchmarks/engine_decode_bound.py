"""How far the engine's decode step is from the memory-bandwidth bound.

B sequences of L essay tokens are prefilled (not timed); then every step decodes one
token for all of them, and the median of the timed steps (robust to a shared VM's
stalls; the mean is printed too) is compared with the bound:
the time to read the weights once (in the dtype the matmuls run in) plus the KV the
step reads (the blocks in use), at the bandwidth measured on this machine by a large
copy (bench/bandwidth.py). Prints one row per policy. --kv-bits 4 (8, 2) stores the
pages KIVI-quantized: the bound then counts the quantized pages' bytes.

    .venv/bin/python benchmarks/engine_decode_bound.py --batch 16 --prompt-len 2048 --policies full,snapkv,ada-snapkv
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kvsqueeze.bench.arguments import positive_int
from kvsqueeze.bench.bandwidth import measure_bandwidth
from kvsqueeze.bench.engine import essay_prompts
from kvsqueeze.engine.llm_engine import EngineArgs, LLMEngine
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.hf.models import model_folder


def decode_row(args: argparse.Namespace, policy: str, bandwidth: float) -> dict:
    engine = LLMEngine(
        EngineArgs(
            model=str(model_folder(args.model)), policy=policy, keep=args.keep, kv_memory=args.kv_memory,
            dtype=args.dtype, max_num_batched_tokens=args.prompt_len, kv_bits=args.kv_bits, kv_group=args.kv_group,
        )
    )  # fmt: skip
    # Long enough that no sequence finishes while the later ones still prefill (one prompt per step).
    params = SamplingParams(temperature=0.0, max_tokens=2 * args.batch + args.steps + 8, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in essay_prompts(engine.tokenizer, args.batch, args.prompt_len)]
    while any(s.in_prefill for s in seqs) or not all(s.output_token_ids for s in seqs):
        engine.step()
    if len(engine.scheduler.running) != args.batch:
        raise SystemExit(f"only {len(engine.scheduler.running)} of {args.batch} sequences fit: give more --kv-memory")
    engine.step()  # warm-up
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    weight_bytes = engine.runner.model.weight_nbytes
    kv_bytes = engine.blocks.blocks_in_use() * engine.blocks.block_nbytes
    step_ms = 1e3 * statistics.median(times)
    bound_ms = 1e3 * (weight_bytes + kv_bytes) / bandwidth
    return {
        "policy": policy, "kv_bits": args.kv_bits, "batch": args.batch, "prompt_len": args.prompt_len,
        "decode_ms_per_step": round(step_ms, 1), "decode_ms_mean": round(1e3 * statistics.mean(times), 1),
        "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "bound_ms_per_step": round(bound_ms, 1),
        "ratio_to_bound": round(step_ms / bound_ms, 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policies", default="full,snapkv,ada-snapkv")
    parser.add_argument("--keep", type=float, default=0.125)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--prompt-len", type=positive_int, default=2048)
    parser.add_argument("--steps", type=positive_int, default=32)
    parser.add_argument("--kv-memory", default="2GiB")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--kv-bits", type=int, default=16, help="16, or 8 / 4 / 2 for KIVI-quantized pages")
    parser.add_argument("--kv-group", type=positive_int, default=32)
    args = parser.parse_args()
    bandwidth = measure_bandwidth("cpu")
    print(f"bandwidth {bandwidth / 1e9:.1f} GB/s")
    for policy in args.policies.split(","):
        print(json.dumps(decode_row(args, policy, bandwidth)), flush=True)


if __name__ == "__main__":
    main()
