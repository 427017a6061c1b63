"""Held-out perplexity of SmolLM2-135M converted to SwiftKV before any distillation, on
the held-out essays `kvsqueeze distill --seq-len 256 --eval-tokens 1024` evaluates on:
l = 15 without and with AcrossKV-2, and l = 30 (nothing skipped: the original model)."""

from kvsqueeze.hf.models import load_model
from kvsqueeze.swiftkv import convert
from kvsqueeze.swiftkv.distill import DistillConfig, Split, perplexity

original, tokenizer = load_model("smollm2-135m")
held_out = Split.of(tokenizer, DistillConfig(seq_len=256, eval_tokens=1024)).held_out
for kv_layer, group in [(15, 1), (15, 2), (30, 1)]:
    ppl = perplexity(convert(original, kv_layer=kv_layer, across_group=group), held_out)
    print(f"kv_layer={kv_layer} across_kv={group}: held-out perplexity {ppl:.2f}")
