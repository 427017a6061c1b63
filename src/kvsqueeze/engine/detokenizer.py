"""Incremental detokenization with stop strings.

The whole output is decoded again each step (a few hundred tokens: microseconds with
`tokenizers`), which keeps multi-token characters right. Text that could still
become a stop string is held back from the stream until it cannot.
"""

from __future__ import annotations

from collections.abc import Callable

from kvsqueeze.engine.sequence import Sequence


def update_text(seq: Sequence, decode: Callable[[list[int]], str]) -> bool:
    """Refresh seq.text from its output tokens, cut before the first stop string;
    True if a stop string was found."""
    text = decode(seq.output_token_ids)
    hits = [at for at in (text.find(stop) for stop in seq.params.stop) if at >= 0]
    seq.text = text[: min(hits)] if hits else text
    return bool(hits)


def take_delta(seq: Sequence) -> str:
    """Text to stream now: everything new, except (while running) a tail that could
    still change: an incomplete UTF-8 character (decoded as U+FFFD until its last byte
    comes) or the start of a stop string."""
    text = seq.text
    if not seq.is_finished:
        text = text.rstrip("\ufffd")
        for stop in seq.params.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    text = text[: len(text) - k]
                    break
    delta = text[seq.sent_chars :]
    seq.sent_chars = max(seq.sent_chars, len(text))
    return delta
