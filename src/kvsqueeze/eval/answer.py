"""Answers out of a compressed cache, one sequence at a time: the log-probability of
given tokens (teacher forcing), and a greedy answer graded against a target in the
same forward. (The decode loop itself is hf/decode.py's.)"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.decode import greedy


def forced_logits(model: PreTrainedModel, cache: KVSqueezeCache, logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """[len(ids) + 1, vocab] in fp32: row i predicts ids[i] and the last row the token
    after them, where `logits` [1, vocab] predicts ids[0] and the cache holds what came
    before. The ids enter the cache."""
    if not ids:
        return logits.float()
    out = model(torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True).logits
    return torch.cat([logits.float(), out[0].float()], dim=0)


def token_logprobs(model: PreTrainedModel, cache: KVSqueezeCache, logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | everything before it) for each i, where `logits` [1, vocab]
    predicts ids[0] and the cache holds what came before. The ids enter the cache."""
    predicting = forced_logits(model, cache, logits, ids)[:-1]
    return torch.log_softmax(predicting, dim=-1).gather(1, torch.tensor(ids, device=model.device)[:, None])[:, 0]


def graded_answer(
    model: PreTrainedModel,
    cache: KVSqueezeCache,
    logits: torch.Tensor,
    lead: list[int],
    target: list[int],
    drafts: list[list[int]],
    max_new_tokens: int,
    stop: set[int],
    ends_answer: Callable[[list[int]], bool],
) -> tuple[list[int], float | None]:
    """The greedy answer after `lead` (tokens the cache takes first, e.g. a question the
    compressed prompt lacks) and the mean log-prob of `target` as that answer (None
    without a target). `logits` predicts lead's first token from the cache.

    Speculative decoding, with guesses instead of a draft model: one forward of a guess
    gives every greedy pick for as long as the picks follow it, so an answer guessed
    right costs one forward, not one per token. The first guess is the target (that
    forward also grades it); where the picks leave a guess, the next is the first of
    `drafts` (e.g. other policies' answers to the same prompt, most common first) that
    goes on from the picks so far; with none left, plain greedy decoding finishes the
    answer. Each guess runs on the cache as it was after the lead: a wrong guess's
    tokens are rolled back (KVSqueezeCache.rollback), or, where a quantized cache could
    not undo them all, the guess runs on a copy."""
    start = forced_logits(model, cache, logits, lead)[-1:]
    longest = max(len(guess) for guess in [target, *drafts])  # a guess is the target, a draft or a prefix of one
    after_lead = _restorer(cache, longest)
    rows = forced_logits(model, cache, start, target)  # rows[k] predicts target[k]
    logprob = None
    if target:
        picked = torch.log_softmax(rows[:-1], dim=-1).gather(1, torch.tensor(target, device=rows.device)[:, None])
        logprob = float(picked.mean())
    tokens: list[int] = []
    guess = target
    while not _follow(rows, guess, tokens, max_new_tokens, stop, ends_answer):
        if tokens == guess:  # every pick was the guess's: the cache holds lead + tokens, go on from there
            more = greedy(
                model, cache, rows[-1:], max_new_tokens - len(tokens), stop, lambda t: ends_answer(tokens + t)
            )
            return tokens + more, logprob
        guess = next((d for d in drafts if len(d) > len(tokens) and d[: len(tokens)] == tokens), tokens)
        cache = after_lead()
        rows = forced_logits(model, cache, start, guess)
    return tokens, logprob


def _restorer(cache: KVSqueezeCache, longest: int) -> Callable[[], KVSqueezeCache]:
    """A function giving the cache as it is now, each time it is called: the cache itself,
    rolled back to a mark, where up to `longest` more tokens can be undone; else a fresh
    copy of a copy taken now (a quantized cache whose residual could fill)."""
    room = cache.rollback_room()
    if room is None or longest <= room:
        mark = cache.mark()

        def rolled_back() -> KVSqueezeCache:
            cache.rollback(mark)
            return cache

        return rolled_back
    saved = _copy(cache)
    return lambda: _copy(saved)


def _copy(cache: KVSqueezeCache) -> KVSqueezeCache:
    """An independent copy of the cache's contents, for a quantized cache whose guesses
    could fill a residual group (which no rollback undoes); the model it refers to is
    shared, not copied."""
    return copy.deepcopy(cache, {id(cache.model): cache.model})


def _follow(
    rows: torch.Tensor,
    guess: list[int],
    tokens: list[int],
    max_new_tokens: int,
    stop: set[int],
    ends_answer: Callable[[list[int]], bool],
) -> bool:
    """Append to `tokens` the greedy picks of `rows` (rows[k] predicts answer token k
    after guess[:k], which starts with `tokens`) while they follow the guess, with
    greedy()'s stopping rules; the first pick that leaves the guess is appended too.
    True once the answer is finished."""
    while len(tokens) < min(len(guess), max_new_tokens):
        token = int(rows[len(tokens)].argmax())
        if token in stop:
            return True
        tokens.append(token)
        if len(tokens) == max_new_tokens or ends_answer(tokens):
            return True
        if token != guess[len(tokens) - 1]:
            return False
    return len(tokens) >= max_new_tokens
