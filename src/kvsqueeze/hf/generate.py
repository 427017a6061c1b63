"""One prompt through a model with a compressed cache, measured: the library path
behind `kvsqueeze generate` and the demo."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.hf.cache import KVSqueezeCache, use_kvsqueeze_attention
from kvsqueeze.hf.decode import greedy, stop_ids
from kvsqueeze.hf.kvzip import reconstruct
from kvsqueeze.hf.models import max_context
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.prompt import encode_prompt
from kvsqueeze.policy import Policy
from kvsqueeze.policy.reconstruction import needs_reconstruction
from kvsqueeze.store.quantized_kv import KVQuantConfig


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    kv_bytes_full: int
    kv_bytes_stored: int
    kept_tokens_per_head: list[list[int]]
    prefill_seconds: float
    decode_tokens_per_second: float
    policy: str
    budget: str
    question_aware: bool
    kv_quantization: str = "kv16"

    def to_json(self) -> dict:
        return asdict(self)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    policy: Policy,
    context: str,
    question: str | None = None,
    question_aware: bool = True,
    max_new_tokens: int = 64,
    chat: bool = False,
    quant: KVQuantConfig | None = None,
) -> GenerationResult:
    """Greedy generation with `policy` compressing the cache after prefill.

    Question-aware: context and question are prefilled together, then compressed.
    Question-agnostic: the context alone is prefilled and compressed; the question
    is appended to the compressed cache uncompressed. `quant` says how the kept
    entries are stored (KIVI-quantized below 16 bits; None: unquantized).
    """
    quant = quant or KVQuantConfig()
    if not context.strip() and not (question or "").strip():
        raise KVSqueezeError("the prompt is empty")
    if max_new_tokens < 1:
        raise KVSqueezeError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    context_ids, question_ids = encode_prompt(tokenizer, context, question, chat)
    prompt_len = len(context_ids) + len(question_ids)
    limit = max_context(model)
    if prompt_len + max_new_tokens > limit:
        raise KVSqueezeError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds the model's context of {limit}"
        )
    device = model.device
    prompt = torch.tensor([context_ids + question_ids], device=device)
    split = prompt_len if question_aware or not question_ids or not context_ids else len(context_ids)

    with torch.inference_mode(), use_kvsqueeze_attention(model):
        start = time.perf_counter()
        if needs_reconstruction(policy):  # KVzip scores the dense prefill by reconstructing the context
            record = reconstruct(model, tokenizer, record_prefill(model, prompt[:, :split]), context_ids, chat)
            cache, last = record.cache(model, policy, quant), record.last_logits
        else:
            cache = KVSqueezeCache.storing(model, policy, quant)
            last = model(prompt[:, :split], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if split < prompt_len:  # question-agnostic: the question reaches the compressed cache
            last = model(prompt[:, split:], past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        prefill_seconds = time.perf_counter() - start
        kept = cache.kept_tokens_per_head(0)
        cache.reserve(max_new_tokens)  # room for every new token at once: no regrowth while decoding
        start = time.perf_counter()
        new = greedy(model, cache, last, max_new_tokens, stop_ids(model))
        decode_seconds = time.perf_counter() - start
        cache.trim()  # what an early stop left unused goes back: the bytes reported are the tokens' own
    decoded = max(len(new) - 1, 0)  # forward passes after prefill: the last token is not fed back

    text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerationResult(
        text=text,
        prompt_tokens=prompt_len,
        new_tokens=len(new),
        kv_bytes_full=cache.full_nbytes,
        kv_bytes_stored=cache.nbytes,
        kept_tokens_per_head=kept,
        prefill_seconds=prefill_seconds,
        decode_tokens_per_second=decoded / decode_seconds if decode_seconds > 0 else 0.0,
        policy=policy.name,
        budget=policy.budget.describe() if policy.compresses else "keep=1.0",
        question_aware=question_aware,
        kv_quantization=quant.describe(),
    )
