"""Text -> token ids, with the context and question kept apart so the context can be
compressed before the question is seen. Shared by generation and evaluation."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from kvsqueeze.policy.reconstruction import plain_question


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, context: str, question: str | None, chat: bool, answer_prefix: str = ""
) -> tuple[list[int], list[int]]:
    """Token ids of the context part and of the question part (with any chat
    template suffix, then `answer_prefix`: the start of the answer, which the model
    continues), so the context can be compressed before the question is seen."""
    if chat:
        user = context if not question else f"{context}\n\n{question}"
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
        cut = full.index(context) + len(context)
        prefix, suffix, special = full[:cut], full[cut:] + answer_prefix, False
    else:
        suffix = plain_question(question, answer_prefix)
        prefix, special = context, True
    prefix_ids = tokenizer(prefix, add_special_tokens=special)["input_ids"] if prefix else []
    suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    return prefix_ids, suffix_ids
