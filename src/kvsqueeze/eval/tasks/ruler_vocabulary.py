"""Words for RULER-style tasks, taken from the essays so that no word list has to
be downloaded: keys, values and word lists are drawn from it with a seeded rng."""

from __future__ import annotations

import random
import re
from functools import cache

from kvsqueeze.data.haystack import essays_text


@cache
def vocabulary() -> tuple[str, ...]:
    """Distinct lower-case words of 4 to 9 letters in the essays, sorted."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,9}\b", essays_text()))))


def key(rng: random.Random) -> str:
    """A two-word key such as "orbit-lantern": never a phrase of the essays."""
    return "-".join(rng.sample(vocabulary(), 2))


def number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def coded_word(rng: random.Random, letters: int = 5) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(letters))
