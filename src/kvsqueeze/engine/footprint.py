"""A sequence's peak KV footprint, in blocks, known before it runs.

The scheduler admits a sequence only when the peaks of every running sequence fit in
the pool beside its own, so a sequence that stays within max_tokens is never
preempted (a preemption throws away its whole prefill: on 32 x 2048-token prompts
with 256 tokens out, the 12 preemptions of greedy admission recomputed 38% more
prompt tokens than the workload has). The peak is where the footprint is largest:
the uncompressed prompt just before the policy compresses it, or the end of the
generation, when the kept prompt and every generated token (up to the per-head
decoding cap) are stored; once a sequence has compressed, only the second remains,
so a compressed sequence reserves its compressed footprint.
"""

from __future__ import annotations

import torch

from kvsqueeze.engine.sequence import Sequence


def peak_blocks(seq: Sequence, num_layers: int, num_kv_heads: int, block_size: int) -> tuple[int, int]:
    """Blocks `seq` holds at its largest over every head of every layer (cache entry):
    (before its policy compresses, after). Once it has compressed, only the second is
    still to come. Without compression both are the end of the generation.

    Compressed heads get one block of slack each: Ada-KV moves budget between the heads
    of a layer, so a head may keep more than the mean, and each head rounds up a block."""

    def blocks(tokens: int) -> int:
        return -(-tokens // block_size)

    policy, prompt, new = seq.policy, seq.num_prompt_tokens, seq.params.max_tokens
    if not policy.compresses:
        end = num_layers * num_kv_heads * blocks(prompt + new)
        return end, end
    compressed = seq.compress_at  # the prompt, or a shared prefix; what follows a prefix is kept whole
    seen = torch.tensor([compressed])
    budget = policy.budget.per_head(seen)
    after = 0
    for layer in range(num_layers):
        kept = min(int(policy.schedule(budget, layer, num_layers, policy.window, seen)[0]), compressed)
        tokens = kept + prompt - compressed + new
        if seq.max_kv_tokens is not None:
            tokens = min(tokens, max(seq.max_kv_tokens, kept + prompt - compressed))
        after += num_kv_heads * (blocks(tokens) + 1)
    return max(num_layers * num_kv_heads * blocks(prompt), after), after
