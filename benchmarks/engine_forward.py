"""The engine's own forward against transformers' forward on the same model, on CPU.

    python benchmarks/engine_forward.py [--model-dir DIR] [--prompt-len 2048] [--num-seqs 2]
        [--batch-tokens 2048] [--decode-batch 16] [--decode-context 2048] [--decode-steps 8]
        [--repeats 2] [--threads N] [--bf16-compute]

Prefill: `--num-seqs` random prompts of `--prompt-len` tokens. Ours runs them as flat
batches of at most `--batch-tokens` tokens (the scheduler's token budget), with the dense
backend; transformers runs one prompt per forward (logits_to_keep=1). Each round runs every
variant once, side by side, and the best round is kept: the machine is shared and noisy.
Decode: ms per step at `--decode-batch` sequences of `--decode-context` cached tokens
(random K/V written straight into the dense backend), against the memory bound
(weights + KV bytes read per step over the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import time

import torch

from kvsqueeze.bench.bandwidth import measure_bandwidth
from kvsqueeze.engine import AttentionBatch, ModelRunner
from kvsqueeze.hf.models import DEFAULT_MODEL, load_model, smollm2_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prefill_batches(prompts: list[list[int]], budget: int) -> list[AttentionBatch]:
    """Cut the prompts into flat batches of at most `budget` tokens, in order, as a
    chunked-prefill scheduler would (a prompt may span batches)."""
    batches, pieces, room = [], [], budget
    for sid, ids in enumerate(prompts):
        pos = 0
        while pos < len(ids):
            n = min(room, len(ids) - pos)
            pieces.append((sid, ids[pos : pos + n], pos, pos + n == len(ids)))
            pos, room = pos + n, room - n
            if room == 0:
                batches.append(pieces)
                pieces, room = [], budget
    if pieces:
        batches.append(pieces)
    return [
        AttentionBatch.build(
            [p[0] for p in b], [p[1] for p in b], [p[2] for p in b], [True] * len(b), [p[3] for p in b]
        )
        for b in batches
    ]


def time_ours(runner: ModelRunner, prompts: list[list[int]], budget: int) -> float:
    batches = prefill_batches(prompts, budget)
    start = time.perf_counter()
    for batch in batches:
        runner.run(batch)
    elapsed = time.perf_counter() - start
    for sid in range(len(prompts)):
        runner.free(sid)
    return elapsed


def time_hf(model, prompts: list[list[int]]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            model(torch.tensor([ids]), logits_to_keep=1)
    return time.perf_counter() - start


def decode_ms(runner: ModelRunner, batch: int, context: int, steps: int) -> tuple[float, int]:
    """Best ms per decode step, and the bytes one step reads (weights + KV)."""
    cfg, backend = runner.config, runner.backend
    kv = torch.randn(context, cfg.num_kv_heads, cfg.head_dim).to(runner.dtype)
    for sid in range(batch):
        for layer in range(cfg.num_layers):
            backend.store(layer, sid, 0, kv, kv)
    best = float("inf")
    for step in range(steps):
        b = AttentionBatch.build(list(range(batch)), [[5]] * batch, [context + step] * batch)
        start = time.perf_counter()
        runner.run(b)
        best = min(best, time.perf_counter() - start)
    for sid in range(batch):
        runner.free(sid)
    kv_bytes = 2 * batch * context * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv.element_size()
    return best * 1e3, runner.model.weight_nbytes + kv_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="HF folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--num-seqs", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--decode-context", type=int, default=2048)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16-compute", action="store_true", help="also run ours with bf16 matmuls")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = args.model_dir or str(smollm2_path())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_seqs)]
    n_tokens = args.num_seqs * args.prompt_len

    variants = {}  # name -> (timer, runner or None)
    for dname, dtype in DTYPES.items():
        hf, _ = load_model(args.model_dir or DEFAULT_MODEL, dtype=dtype)
        variants[f"transformers {dname}"] = (lambda m=hf: time_hf(m, prompts), None)
        runner = ModelRunner(model_dir, dtype=dtype)
        label = f"ours {dname}" + (" (fp32 compute)" if runner.compute_dtype != dtype else "")
        variants[label] = (lambda r=runner: time_ours(r, prompts, args.batch_tokens), runner)
        if args.bf16_compute and dtype == torch.bfloat16 and runner.compute_dtype != dtype:
            r16 = ModelRunner(model_dir, dtype=dtype, compute_dtype=dtype)
            variants[f"ours {dname} (bf16 compute)"] = (lambda r=r16: time_ours(r, prompts, args.batch_tokens), r16)

    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):
        for name, (timer, _) in variants.items():
            best[name] = min(best[name], timer())
    bandwidth = measure_bandwidth("cpu")
    print(
        f"threads {torch.get_num_threads()}; CPU {torch.backends.cpu.get_cpu_capability()}; prefill {args.num_seqs} x "
        f"{args.prompt_len} tokens, ours in batches of {args.batch_tokens}; decode {args.decode_batch} x "
        f"{args.decode_context} context; copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print(f"{'forward':34} {'prefill tok/s':>14} {'vs HF':>6} {'decode ms/step':>15} {'bound ms':>9} {'x bound':>8}")
    for name, (_, runner) in variants.items():
        tps = n_tokens / best[name]
        hf_name = "transformers " + name.split()[1]
        row = f"{name:34} {tps:14.0f} {best[hf_name] / best[name]:6.2f}"
        if runner is not None:
            ms, nbytes = decode_ms(runner, args.decode_batch, args.decode_context, args.decode_steps)
            bound = nbytes / bandwidth * 1e3
            row += f" {ms:15.1f} {bound:9.1f} {ms / bound:8.2f}"
        print(row)


if __name__ == "__main__":
    main()
