"""One sample under every policy: the model runs over the prompt once, then each
policy compresses that prefill (hf/prefill.py) and answers from its own cache. The
answers are greedy; they are decoded speculatively from guesses (eval/answer.py): the
target, then the answers of the policies before, which a policy often repeats."""

from __future__ import annotations

import math
import time
from collections import Counter

import torch
from transformers import PreTrainedModel

from kvsqueeze.eval.answer import graded_answer, token_logprobs
from kvsqueeze.eval.metrics import score
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample
from kvsqueeze.hf.cache import use_kvsqueeze_attention
from kvsqueeze.hf.decode import stop_ids
from kvsqueeze.hf.kvzip import records_by_policy
from kvsqueeze.hf.prefill import PrefillRecord, record_prefill
from kvsqueeze.policy import Policy
from kvsqueeze.store.quantized_kv import KVQuantConfig


def budget_fields(policy: Policy) -> dict:
    """The row's budget columns; the full cache is keep=1.0."""
    if not policy.compresses:
        return {"keep": 1.0, "tokens": None}
    return {"keep": policy.budget.keep, "tokens": policy.budget.tokens}


def _compress(model: PreTrainedModel, record: PrefillRecord, policy: Policy, quant: KVQuantConfig | None) -> tuple:
    start = time.perf_counter()
    cache = record.cache(model, policy, quant)
    seconds = time.perf_counter() - start
    measured = {
        "kv_bytes_stored": cache.nbytes,
        "kv_bytes_full": cache.full_nbytes,
        # The shared forward plus this policy's own scoring and compaction.
        "prefill_seconds": round(record.seconds + seconds, 4),
        "kept_tokens_per_head": cache.kept_tokens_per_head(0),
    }
    return cache, measured


def evaluate_sample(
    model: PreTrainedModel,
    fmt: PromptFormat,
    sample: Sample,
    policies: list[Policy],
    question_agnostic: bool,
    quant: KVQuantConfig | None = None,
) -> list[dict]:
    """One row per policy: score, graded log-likelihood and the cache's cost. `quant`
    says how every cache stores what its policy keeps (None: unquantized)."""
    if sample.metric == "perplexity":
        return _perplexity_rows(model, fmt, sample, policies, quant)
    context_ids, question_ids = fmt.encode(sample.context, sample.question, sample.answer_prefix)
    target_ids = fmt.tokens(sample.target) if sample.target else []
    prompt = context_ids if question_agnostic else context_ids + question_ids
    stop = stop_ids(model)

    def ends_answer(tokens: list[int]) -> bool:
        return sample.single_line and "\n" in fmt.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    rows = []
    answers: Counter[tuple[int, ...]] = Counter()
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        prefilled = record_prefill(model, torch.tensor([prompt], device=model.device))
        records = records_by_policy(model, fmt.tokenizer, prefilled, context_ids, fmt.chat, policies)
        for policy, record in zip(policies, records, strict=True):
            cache, measured = _compress(model, record, policy, quant)
            # In question-agnostic mode the question reaches the compressed cache uncompressed.
            lead = question_ids if question_agnostic else []
            drafts = [list(a) for a, _ in answers.most_common()]  # policies often give the same answer
            answer, answer_logprob = graded_answer(
                model,
                cache,
                record.last_logits,
                lead,
                target_ids,
                drafts,
                sample.max_new_tokens,
                stop,
                ends_answer,
            )
            answers[tuple(answer)] += 1
            prediction = fmt.tokenizer.decode(answer, skip_special_tokens=True)
            rows.append(
                {
                    "policy": policy.name,
                    **budget_fields(policy),
                    "score": score(sample.metric, prediction, sample.answers, sample.all_classes),
                    "answer_logprob": None if answer_logprob is None else round(answer_logprob, 4),
                    "prediction": prediction,
                    "prompt_tokens": len(context_ids) + len(question_ids),
                    **measured,
                }
            )
    return rows


def _perplexity_rows(
    model: PreTrainedModel, fmt: PromptFormat, sample: Sample, policies: list[Policy], quant: KVQuantConfig | None
) -> list[dict]:
    context_ids, continuation_ids = fmt.tokens(sample.context), fmt.tokens(sample.continuation)
    rows = []
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        prefilled = record_prefill(model, torch.tensor([context_ids], device=model.device))
        records = records_by_policy(model, fmt.tokenizer, prefilled, context_ids, False, policies)
        for policy, record in zip(policies, records, strict=True):
            cache, measured = _compress(model, record, policy, quant)
            nll = -float(token_logprobs(model, cache, record.last_logits, continuation_ids).mean())
            rows.append(
                {
                    "policy": policy.name,
                    **budget_fields(policy),
                    "score": round(math.exp(nll), 4),
                    "answer_logprob": round(-nll, 4),
                    "prediction": "",
                    "prompt_tokens": len(context_ids) + len(continuation_ids),
                    **measured,
                }
            )
    return rows
