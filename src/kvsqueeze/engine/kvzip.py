"""KVzip's context reconstruction in the engine (Kim et al., "KVzip: Query-Agnostic KV
Cache Compression with Context Reconstruction", arXiv 2505.23416).

A request whose policy scores by reconstruction carries its reconstruction rows
(policy/reconstruction.py, shared with the HF path): once its context (the prompt, or a
shared prefix) is prefilled, the scheduler runs one row per step in place of the
sequence's next chunk; each row attends over the context's uncompressed pages and its
own keys and writes nothing to the pages (kv_cache.py), and its queries and keys go to
the scorer. After the last row the policy compresses as for any other policy.

The engine gets token ids, not a context and a question, so every request's
instruction follows its context in the raw-text form of `plain_question` (no chat
template), the HF path's form for a plain prompt: a chat request's ids already hold its
template, and which of them are the context the engine cannot tell. For a chat request
its rows therefore differ from the HF path's chat form, which puts the instruction
inside the context's user message.
"""

from __future__ import annotations

from kvsqueeze.engine.tokenizer import Tokenizer
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policy.reconstruction import MARK, RepeatRow, first_context_token, plain_question, repeat_rows


def context_rows(tokenizer: Tokenizer, context_ids: list[int], chunk: int) -> list[RepeatRow]:
    """The reconstruction rows of a raw-text context (a BOS token before it is not
    repeated), at most `chunk` context tokens each."""

    def instruction_ids(text: str) -> list[int]:
        return tokenizer.encode(plain_question(text), add_special_tokens=False)

    first = first_context_token(tokenizer.encode(MARK), context_ids)
    rows = repeat_rows(context_ids, first, instruction_ids, tokenizer.decode, chunk)
    if not rows:
        raise KVSqueezeError("kvzip reconstructs the context: give at least one token after the prompt's BOS")
    return rows
