"""What a RULER subtask builder returns: a context that can be sized, and the
question and answers that go with it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Built:
    make_context: Callable[[int], str]  # size parameter -> context; grows with it
    most: int  # largest size parameter worth trying
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    target: str
    max_new_tokens: int
