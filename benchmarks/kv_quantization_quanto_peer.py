"""The peer row for KV quantization: transformers' QuantizedCache (quanto backend) on
the same perplexity samples `kvsqueeze eval --task ppl` scores, so its perplexity
sits beside kvsqueeze's KIVI rows. Needs optimum-quanto importable (e.g.
`pip install --no-deps --target DIR optimum-quanto` and PYTHONPATH=DIR).

The context is prefilled into the QuantizedCache (quantized past the residual
window), then the continuation is teacher-forced through it in one chunk, as
eval does with kvsqueeze's cache. Prints one JSON line per (bits, sample).

    PYTHONPATH=/tmp/quanto python benchmarks/kv_quantization_quanto_peer.py --length 2304 --samples 2 --bits 4,2
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from transformers import QuantizedCache

from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.tasks.base import TaskRequest
from kvsqueeze.eval.tasks.ppl import PerplexityTask
from kvsqueeze.hf.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=2304)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--bits", default="4,2")
    parser.add_argument("--group", type=int, default=64, help="q_group_size (quanto's default)")
    parser.add_argument("--residual", type=int, default=128)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, dtype=torch.bfloat16, device="cpu")
    model.set_attn_implementation("sdpa")
    fmt = PromptFormat(tokenizer)
    request = TaskRequest(lengths=(args.length,), depths=(0.5,), samples=args.samples, seed=0)
    for sample in PerplexityTask().samples(fmt, request):
        context, continuation = fmt.tokens(sample.context), fmt.tokens(sample.continuation)
        for bits in (int(b) for b in args.bits.split(",")):
            cache = QuantizedCache(
                "quanto", model.config, nbits=bits, q_group_size=args.group, residual_length=args.residual
            )
            with torch.inference_mode():
                last = model(torch.tensor([context]), past_key_values=cache, use_cache=True).logits[:, -1]
                out = model(torch.tensor([continuation]), past_key_values=cache, use_cache=True).logits[0]
            logits = torch.cat([last.float(), out[:-1].float()])
            nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(continuation)[:, None]).mean()
            row = {"sample": sample.index, "bits": bits, "group": args.group, "residual": args.residual}
            print(json.dumps({**row, "perplexity": round(math.exp(float(nll)), 4)}), flush=True)


if __name__ == "__main__":
    main()
