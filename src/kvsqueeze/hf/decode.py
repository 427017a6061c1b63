"""Greedy decoding out of a cache, one sequence at a time: the one decode loop of
generation and evaluation, and the one place that reads a model's stop tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import Cache, PreTrainedModel


def stop_ids(model: PreTrainedModel) -> set[int]:
    """The model's end-of-sequence ids (its generation config holds one id, a list or none)."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def greedy(
    model: PreTrainedModel,
    cache: Cache,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop: set[int],
    ends_answer: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Tokens picked greedily, starting from next-token `logits` [1, vocab], until a
    stop token, `ends_answer(tokens)` or `max_new_tokens`. The last token is not fed
    back: nobody reads the logits it would give."""
    tokens: list[int] = []
    while len(tokens) < max_new_tokens:
        token = int(logits[0].argmax())
        if token in stop:
            break
        tokens.append(token)
        if len(tokens) == max_new_tokens or (ends_answer is not None and ends_answer(tokens)):
            break
        step = torch.tensor([[token]], device=model.device)
        logits = model(step, past_key_values=cache, use_cache=True).logits[:, -1]
    return tokens
