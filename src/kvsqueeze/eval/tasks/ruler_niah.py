"""RULER's needle tasks (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", arXiv 2404.06654): "special magic" key-value
sentences hidden in essays at random depths. Single (a numeric or a word value),
multi-key (distractor needles with other keys), multi-value (one key, several
values, all asked) and multi-query (several keys asked at once)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvsqueeze.data.haystack import essay_tokens, essays_slice, hide
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.tasks.ruler_build import Built
from kvsqueeze.eval.tasks.ruler_vocabulary import key, number, vocabulary

NEEDLE = "One of the special magic {kind} for {key} is: {value}."


@dataclass(frozen=True)
class NeedleSpec:
    kind: str  # "numbers" or "words"
    keys: int  # needles with distinct keys
    values_per_key: int
    queried: int  # keys asked about (the first ones)


SPECS = {
    "niah_single_numeric": NeedleSpec("numbers", keys=1, values_per_key=1, queried=1),
    "niah_single_word": NeedleSpec("words", keys=1, values_per_key=1, queried=1),
    "niah_multikey": NeedleSpec("numbers", keys=4, values_per_key=1, queried=1),
    "niah_multivalue": NeedleSpec("numbers", keys=1, values_per_key=4, queried=1),
    "niah_multiquery": NeedleSpec("numbers", keys=4, values_per_key=1, queried=4),
}


def build_niah(spec: NeedleSpec, rng: random.Random, fmt: PromptFormat, length: int) -> Built:
    keys = [key(rng) for _ in range(spec.keys)]
    values = {
        k: [number(rng) if spec.kind == "numbers" else rng.choice(vocabulary()) for _ in range(spec.values_per_key)]
        for k in keys
    }
    needles = [(rng.random(), NEEDLE.format(kind=spec.kind, key=k, value=v)) for k in keys for v in values[k]]
    asked = keys[: spec.queried]
    answers = tuple(v for k in asked for v in values[k])
    names = ", ".join(asked)
    if len(answers) == 1:
        question = f"What is the special magic {spec.kind[:-1]} for {names} mentioned in the provided text?"
        prefix = f"The special magic {spec.kind[:-1]} for {names} mentioned in the provided text is"
    else:
        question = f"What are all the special magic {spec.kind} for {names} mentioned in the provided text?"
        prefix = f"The special magic {spec.kind} for {names} mentioned in the provided text are"
    total = len(essay_tokens(fmt.tokenizer))
    offset = rng.randrange(max(1, total - length))

    def context(n: int) -> str:
        return hide(essays_slice(fmt.tokenizer, n, offset), needles)

    return Built(
        make_context=context,
        most=min(length, total - offset),
        question=question,
        answer_prefix=prefix,
        answers=answers,
        target=" " + ", ".join(answers) + ".",
        max_new_tokens=12 * len(answers) + 4,
    )
