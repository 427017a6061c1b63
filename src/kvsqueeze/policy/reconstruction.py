"""The inputs of KVzip's context reconstruction (Kim et al., "KVzip: Query-Agnostic KV
Cache Compression with Context Reconstruction", arXiv 2505.23416), shared by the two
paths that run it: the HF path (hf/kvzip.py) and the serving engine (engine/kvzip.py).

After a prompt's prefill the model is fed, over the prompt's uncompressed cache, an
instruction to repeat the context, in the prompt's own format, and then the context
itself, teacher-forced. A long context is repeated in rows of at most `chunk` context
tokens, each its own forward over the prompt's cache; a later row's instruction quotes
the last tokens before it, as KVzip's code does. The tokens before the context text (a
chat template's header, a BOS token) are not repeated: the scorer keeps them first.

Each path says how its prompts are formatted through two functions: the ids of an
instruction placed as the question after the context, and the text of ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from kvsqueeze.policy.policy import Policy

REPEAT = "Repeat the previous context exactly."
REPEAT_FROM = "Repeat the part of the previous context exactly, starting with"
TAIL = 8  # tokens of the previous row a later row's instruction quotes
CHUNK = 2048
# Stands in for the context to find where a prompt format puts it.
MARK = "\u2063kvzip context\u2063"


class RepeatRow(NamedTuple):
    """One reconstruction forward: the instruction, then context tokens [start, end)."""

    start: int
    end: int
    ids: list[int]


def needs_reconstruction(policy: Policy) -> bool:
    """Whether this policy scores by context reconstruction (and compresses at all)."""
    return getattr(policy.scorer, "needs_reconstruction", False) and policy.compresses


def plain_question(question: str | None, answer_prefix: str = "") -> str:
    """The text after a raw-text (not chat-templated) context: the question in its own
    paragraph, then the start of the answer."""
    return (f"\n\n{question}\n" if question else "") + answer_prefix


def first_context_token(header_ids: list[int], context_ids: list[int]) -> int:
    """Tokens before the context text in `context_ids`: the ids it shares with
    `header_ids`, the context part of a prompt whose context is MARK."""
    n = 0
    while n < min(len(header_ids), len(context_ids)) and header_ids[n] == context_ids[n]:
        n += 1
    return n


def repeat_rows(
    context_ids: list[int],
    first: int,
    instruction_ids: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    chunk: int = CHUNK,
) -> list[RepeatRow]:
    """The reconstruction rows of context_ids[first:]: each the ids of a repeat
    instruction (`instruction_ids(text)`, in the prompt's format) and then the next
    `chunk` context tokens."""
    if chunk < 1:
        raise ValueError(f"the KVzip reconstruction chunk must be at least 1 token, got {chunk}")
    rows = []
    for start in range(first, len(context_ids), chunk):
        end = min(start + chunk, len(context_ids))
        if start == first:
            instruction = REPEAT
        else:
            instruction = f'{REPEAT_FROM} "{decode(context_ids[max(first, start - TAIL) : start])}"'
        rows.append(RepeatRow(start, end, instruction_ids(instruction) + context_ids[start:end]))
    return rows
