"""A sequence's peak KV footprint, in blocks, known before it runs.

The scheduler admits a sequence only when the peaks of every running sequence fit in
the pool beside its own, so a sequence that stays within max_tokens is never
preempted (a preemption throws away its whole prefill: on 32 x 2048-token prompts
with 256 tokens out, the 12 preemptions of greedy admission recomputed 38% more
prompt tokens than the workload has). The peak is where the footprint is largest:
the uncompressed prompt just before the policy compresses it, or the end of the
generation, when the kept prompt and every generated token (up to the per-head
decoding cap) are stored; once a sequence has compressed, only the second remains,
so a compressed sequence reserves its compressed footprint. A KVzip sequence's
reconstruction rows (engine/kvzip.py) hold no block: their K/V live only in the
step's activations, like a prefill chunk's, so until its last row the sequence
holds its uncompressed prompt, the first peak, and nothing more.

With a KIVI-quantized cache (arXiv 2402.02750; store/paged_quantized_kv.py) the
prompt is held in full-precision pages until it is compressed, then the kept entries
take one page per key group of G tokens and the decoded ones a full-precision
residual that a group at a time leaves for a quantized page (peak_pages_quantized).
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


def peak_pages_quantized(
    seq: Sequence, num_layers: int, num_kv_heads: int, block_size: int, group: int, residual: int
) -> tuple[int, int]:
    """peak_blocks for a quantized store: pages before the prompt is quantized (the
    prompt in full-precision pages of `block_size` entries), and after (each head's kept
    entries in groups of `group`, plus the groups decoding fills past `residual` + group,
    plus the residual's full-precision pages). Decoding's per-head cap is ignored: it
    evicts entries but can leave every quantized page it touched partly filled, so the
    uncapped count is the bound. One page of slack per head for the kept groups (Ada-KV
    moves budget between heads; a short first group) and one for the residual (it
    starts at an offset into its first page)."""

    def pages(tokens: int, size: int) -> int:
        return -(-tokens // size)

    policy, prompt, new = seq.policy, seq.num_prompt_tokens, seq.params.max_tokens
    flushed = max(0, (new - residual) // group) if new >= residual + group else 0
    decoded = flushed + pages(new - flushed * group, block_size) + 1
    after = 0
    if policy.compresses:
        seen = torch.tensor([prompt])
        budget = policy.budget.per_head(seen)
        for layer in range(num_layers):
            kept = min(int(policy.schedule(budget, layer, num_layers, policy.window, seen)[0]), prompt)
            after += num_kv_heads * (pages(kept, group) + 1 + decoded)
    else:
        after = num_layers * num_kv_heads * (pages(prompt, group) + 1 + decoded)
    return max(num_layers * num_kv_heads * pages(prompt, block_size), after), after
