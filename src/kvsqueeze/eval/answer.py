"""Reading a model's answer out of a compressed cache: greedy decoding, and the
log-probability of given tokens (teacher forcing), both one sequence at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from kvsqueeze.hf import KVSqueezeCache


def stop_ids(model: PreTrainedModel) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def greedy(
    model: PreTrainedModel,
    cache: KVSqueezeCache,
    logits: torch.Tensor,
    max_new_tokens: int,
    stop: set[int],
    ends_answer: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Tokens picked greedily, starting from next-token `logits` [1, vocab], until a
    stop token, `ends_answer(tokens)` or `max_new_tokens`."""
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


def token_logprobs(model: PreTrainedModel, cache: KVSqueezeCache, logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | everything before it) for each i, where `logits` [1, vocab]
    predicts ids[0] and the cache holds what came before. The ids enter the cache."""
    out = model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True).logits
    predicting = torch.cat([logits.float(), out[0, :-1].float()], dim=0)
    return torch.log_softmax(predicting, dim=-1).gather(1, torch.tensor(ids, device=model.device)[:, None])[:, 0]
