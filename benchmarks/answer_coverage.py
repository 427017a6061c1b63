"""Which tokens of the expected answer each kv-head kept after compression.

For one generated sample, prints per layer and kv-head a map of the answer's tokens
in the prompt (x kept, . evicted; three tokens of context on each side) and the
greedy answer, for each policy. It shows why a policy recovers only part of an
answer, e.g. SnapKV keeping the first and last digits of a number but not its middle.

    python benchmarks/answer_coverage.py --task ruler --subtask niah_single_numeric --length 2048 \\
        --policy snapkv:0.4 --policy snapkv:0.1 --policy ada-snapkv:0.1
"""

from __future__ import annotations

import argparse

import torch

from kvsqueeze.eval.tasks import TaskRequest, get_task
from kvsqueeze.eval.unit import loaded
from kvsqueeze.hf import use_kvsqueeze_attention
from kvsqueeze.hf.decode import greedy, stop_ids
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.policy import make_policy

MARGIN = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="ruler")
    parser.add_argument("--subtask", default="niah_single_numeric", help="for ruler: which subtask")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policy", action="append", default=[], help="NAME:KEEP, repeatable")
    args = parser.parse_args()

    model, fmt = loaded(args.model, "float32", "cpu")
    request = TaskRequest((args.length,), (args.depth,), 1, args.seed)
    sample = next(s for s in get_task(args.task).samples(fmt, request) if s.task.endswith(args.subtask))
    context, question = fmt.encode(sample.context, sample.question, sample.answer_prefix)
    prompt = context + question
    answer = fmt.tokens(sample.answers[0])
    start = next(i for i in range(len(prompt)) if prompt[i : i + len(answer)] == answer)
    span = range(start - MARGIN, start + len(answer) + MARGIN)
    print(f"{sample.task}: answer {sample.answers[0]!r} = {len(answer)} tokens at {start} of {len(prompt)}")
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        record = record_prefill(model, torch.tensor([prompt], device=model.device))
        for spec in args.policy or ["snapkv:0.2"]:
            name, _, keep = spec.partition(":")
            cache = record.cache(model, make_policy(name, keep=float(keep or 0.2)))
            print(f"\n{spec}  (columns: kv heads; {MARGIN} tokens either side of the answer)")
            for i, layer in enumerate(cache.layers):
                kv, maps = layer.compressed.store, []
                for h in range(kv.num_heads):
                    kept = set(kv.head(h)[2].tolist())
                    maps.append("".join("x" if p in kept else "." for p in span))
                print(f"  layer {i:2d}  " + "  ".join(maps))
            said = greedy(model, cache, record.last_logits, sample.max_new_tokens, stop_ids(model))
            print(f"  answer: {fmt.tokenizer.decode(said, skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
