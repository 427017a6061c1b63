"""Chat prompts from the model folder's Jinja chat template, rendered in a sandbox the
way transformers renders it (trim_blocks, lstrip_blocks, add_generation_prompt)."""

from __future__ import annotations

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kvsqueeze.engine.tokenizer import Tokenizer


def apply_chat_template(
    tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of `messages`, followed by the assistant's turn opening unless
    `add_generation_prompt` is False."""
    if tokenizer.chat_template is None:
        raise ValueError("this model has no chat template: send a plain completion prompt instead")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        text = env.from_string(tokenizer.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        raise ValueError(f"the chat template refused these messages: {exc}") from exc
    return tokenizer.encode(text, add_special_tokens=False)
