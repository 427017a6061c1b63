"""RequestOutput: what a request has produced so far (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", or None while running


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    delta: str = ""  # text added since the previous output of this request (streaming)
