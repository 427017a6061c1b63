"""How samples become token ids, and how a context is sized to a token length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.hf.prompt import encode_prompt


@dataclass(frozen=True)
class PromptFormat:
    """The tokenizer, and whether prompts go through its chat template (they do
    when it has one: instruct models answer far better inside their template)."""

    tokenizer: PreTrainedTokenizerBase

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, context: str, question: str, answer_prefix: str = "") -> tuple[list[int], list[int]]:
        """(context ids, question ids): the context part can be compressed alone."""
        return encode_prompt(self.tokenizer, context, question, self.chat, answer_prefix)

    def count(self, context: str, question: str, answer_prefix: str = "") -> int:
        context_ids, question_ids = self.encode(context, question, answer_prefix)
        return len(context_ids) + len(question_ids)

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fit(self, make_context: Callable[[int], str], question: str, answer_prefix: str, length: int, most: int) -> str:
        """The context make_context(n) for the largest n in [1, most] whose whole
        prompt is at most `length` tokens (binary search: prompts grow with n)."""
        lo, hi = 1, most
        smallest = self.count(make_context(lo), question, answer_prefix)
        if smallest > length:
            raise KVSqueezeError(f"a prompt of {length} tokens is too short for this task (it needs {smallest})")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count(make_context(mid), question, answer_prefix) <= length:
                lo = mid
            else:
                hi = mid - 1
        return make_context(lo)
