"""Request bodies of the OpenAI-compatible API (the subset we serve), with kvsqueeze's
per-request compression fields. Pydantic checks types; unknown fields are ignored,
as OpenAI's own server does for fields it does not know."""

from __future__ import annotations

from pydantic import BaseModel, Field


class _Common(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    # kvsqueeze: per-request compression
    kv_policy: str | None = None
    kv_keep: float | None = None
    kv_tokens: int | None = None
    kv_max_tokens: int | None = None  # per-head cap while decoding
    # A document the prompt continues, compressed once and shared by requests that repeat it
    # (in a chat request: the conversation's opening system message).
    kv_prefix: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
