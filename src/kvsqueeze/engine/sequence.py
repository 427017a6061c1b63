"""Sequence: one request's tokens and where it stands in the engine."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from kvsqueeze.engine.prefix_cache import PrefixKey
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.policy import Policy
from kvsqueeze.policy.budget import MAX_TOKENS
from kvsqueeze.policy.reconstruction import RepeatRow, needs_reconstruction

_ids = itertools.count()


def check_engine_policy(policy: Policy, compress_chunks: bool = False, swiftkv: bool = False) -> None:
    """Refuse, before anything runs, what the engine cannot apply: a reconstruction
    (KVzip) policy with per-chunk compression, whose chunks it would score without a
    reconstruction, or on a SwiftKV model, whose upper layers run only a prompt's last
    tokens."""
    if not needs_reconstruction(policy):
        return
    if compress_chunks:
        raise ValueError(f"{policy.name} scores the whole context by its reconstruction: not with --compress-chunks")
    if swiftkv:
        raise ValueError(f"{policy.name} is not supported on a SwiftKV model in the engine: use `kvsqueeze generate`")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A request: its prompt, what it generated, and its compression policy.

    `num_computed` counts the tokens whose K/V the cache holds (logically: after
    compression fewer are stored); the prompt is prefilled in chunks until
    num_computed reaches its length, then each step decodes one token.

    `prefix_len` > 0 names the first prompt tokens a shared prefix (prefix_cache.py):
    the policy compresses them on their own, once, and requests with the same prefix
    and policy reuse that compressed KV; the rest of the prompt is kept whole.

    A KVzip policy scores what it compresses by reconstructing it (engine/kvzip.py):
    `repeat_rows` are the reconstruction's forwards, run one a step once num_computed
    reaches compress_at; `num_repeated` counts those done, and the sequence goes on
    only when all are.
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    policy: Policy
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0
    finish_reason: str | None = None  # "stop", "length" or "abort"
    text: str = ""  # detokenized output, stop strings cut off
    sent_chars: int = 0  # characters of `text` already streamed
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    max_kv_tokens: int | None = None  # per-head cap while decoding (None: no eviction after the prompt)
    prefix_len: int = 0
    prefix_key: PrefixKey | None = field(default=None, init=False)  # the prefix cache's key
    repeat_rows: list[RepeatRow] = field(default_factory=list)
    num_repeated: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("empty prompt: a request needs at least one token")
        if needs_reconstruction(self.policy) and not self.repeat_rows:
            raise ValueError(f"{self.policy.name} needs the reconstruction rows of its context (engine/kvzip.py)")
        if needs_reconstruction(self.policy) and self.max_kv_tokens is not None:
            raise ValueError(
                f"max_kv_tokens cannot be combined with {self.policy.name}: decoding runs no reconstruction"
            )
        if self.prefix_len:
            if not 0 < self.prefix_len < len(self.prompt_token_ids):
                raise ValueError(
                    f"a shared prefix of {self.prefix_len} tokens must leave at least one prompt token after it "
                    f"(the prompt has {len(self.prompt_token_ids)})"
                )
            if self.max_kv_tokens is not None:
                raise ValueError("max_kv_tokens cannot be combined with a shared prefix: its blocks are read-only")
            self.prefix_key = PrefixKey(self.policy, tuple(self.prompt_token_ids[: self.prefix_len]))
        if self.max_kv_tokens is not None:
            if not self.policy.compresses:
                raise ValueError(f"max_kv_tokens needs a policy that scores tokens; {self.policy.name!r} keeps all")
            if not max(16, 2 * self.policy.window) <= self.max_kv_tokens <= MAX_TOKENS:
                raise ValueError(
                    f"max_kv_tokens={self.max_kv_tokens} must leave room beside the window of {self.policy.window}: "
                    f"use {max(16, 2 * self.policy.window)} to {MAX_TOKENS}"
                )
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def compress_at(self) -> int:
        """Tokens the policy compresses at once: the shared prefix, else the whole prompt."""
        return self.prefix_len or len(self.prompt_token_ids)

    @property
    def reconstructing(self) -> bool:
        """Its context is prefilled and waits for its reconstruction rows to run."""
        return self.num_computed >= self.compress_at and self.num_repeated < len(self.repeat_rows)

    @property
    def compressed(self) -> bool:
        """Its policy has compressed what it compresses (or would have, keeping all)."""
        return self.num_computed >= self.compress_at and not self.reconstructing

    def start_after_prefix(self) -> None:
        """It forks a cached prefix, compressed already: prefill and reconstruction of it are done."""
        self.num_computed = self.prefix_len
        self.num_repeated = len(self.repeat_rows)

    @property
    def in_prefill(self) -> bool:
        """True until every token but the last generated one is in the cache."""
        return self.num_computed < self.num_tokens - 1 or not self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def reset_for_recompute(self) -> None:
        """Preempted: its cache is dropped; it will prefill prompt + output so far again."""
        self.status = SequenceStatus.WAITING
        self.num_computed = self.num_repeated = 0
        self.num_preemptions += 1
