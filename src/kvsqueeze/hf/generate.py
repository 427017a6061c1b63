"""One prompt through a model with a compressed cache, measured: the library path
behind `kvsqueeze generate` and the demo."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.models import max_context
from kvsqueeze.policy import Policy


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

    def to_json(self) -> dict:
        return asdict(self)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, context: str, question: str | None, chat: bool, answer_prefix: str = ""
) -> tuple[list[int], list[int]]:
    """Token ids of the context part and of the question part (with any chat
    template suffix, then `answer_prefix`: the start of the answer, which the model
    continues), so the context can be compressed before the question is seen."""
    if chat:
        user = context if not question else f"{context}\n\n{question}"
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        cut = full.index(context) + len(context)
        prefix, suffix, special = full[:cut], full[cut:] + answer_prefix, False
    else:
        suffix = (f"\n\n{question}\n" if question else "") + answer_prefix
        prefix, special = context, True
    prefix_ids = tokenizer(prefix, add_special_tokens=special)["input_ids"] if prefix else []
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    return prefix_ids, suffix_ids


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    policy: Policy,
    context: str,
    question: str | None = None,
    question_aware: bool = True,
    max_new_tokens: int = 64,
    chat: bool = False,
) -> GenerationResult:
    """Greedy generation with `policy` compressing the cache after prefill.

    Question-aware: context and question are prefilled together, then compressed.
    Question-agnostic: the context alone is prefilled and compressed; the question
    is appended to the compressed cache uncompressed.
    """
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
    cache = KVSqueezeCache(model, policy)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    with torch.inference_mode():
        start = time.perf_counter()
        if question_aware or not question_ids or not context_ids:
            logits = model(prompt, past_key_values=cache, use_cache=True).logits
        else:
            model(prompt[:, : len(context_ids)], past_key_values=cache, use_cache=True)
            logits = model(prompt[:, len(context_ids) :], past_key_values=cache, use_cache=True).logits
        prefill_seconds = time.perf_counter() - start
        kept = cache.kept_tokens_per_head(0)
        first = logits[:, -1].argmax(dim=-1, keepdim=True)
        sequence = torch.cat([prompt, first], dim=1)
        decode_seconds, decoded = 0.0, 0
        if max_new_tokens > 1 and int(first) not in eos_ids:
            config = GenerationConfig(
                do_sample=False,
                max_new_tokens=max_new_tokens - 1,
                eos_token_id=list(eos_ids) or None,
                pad_token_id=tokenizer.pad_token_id,
            )
            start = time.perf_counter()
            sequence = model.generate(sequence, generation_config=config, past_key_values=cache)
            decode_seconds = time.perf_counter() - start
            decoded = sequence.shape[1] - prompt_len - 1

    new = sequence[0, prompt_len:].tolist()
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
    )
