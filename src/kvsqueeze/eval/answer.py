"""The log-probability of given tokens out of a compressed cache (teacher forcing),
one sequence at a time. (Greedy answers come from hf/decode.py's one decode loop.)"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kvsqueeze.hf import KVSqueezeCache


def token_logprobs(model: PreTrainedModel, cache: KVSqueezeCache, logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | everything before it) for each i, where `logits` [1, vocab]
    predicts ids[0] and the cache holds what came before. The ids enter the cache."""
    out = model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True).logits
    predicting = torch.cat([logits.float(), out[0, :-1].float()], dim=0)
    return torch.log_softmax(predicting, dim=-1).gather(1, torch.tensor(ids, device=model.device)[:, None])[:, 0]
