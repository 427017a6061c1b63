"""RULER's aggregation tasks (Hsieh et al., arXiv 2404.06654), which need the whole
context rather than one place in it: common-words extraction (ten words repeated
many times among words seen a few times) and frequent-words extraction (coded
words with Zipf-like counts; name the three most frequent)."""

from __future__ import annotations

import random

from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.tasks.ruler_build import Built
from kvsqueeze.eval.tasks.ruler_vocabulary import coded_word, vocabulary

COMMON_WORDS, RARE_COUNT = 10, 3
FREQUENT_WORDS = 3


def build_common_words(rng: random.Random, fmt: PromptFormat, length: int) -> Built:
    pool = rng.sample(vocabulary(), 2000)
    common, rare = pool[:COMMON_WORDS], pool[COMMON_WORDS:]

    def context(n: int) -> str:
        # n rare words, 3 times each; common ones up to 30 times (RULER's count), fewer
        # when the prompt is short, but always well above the rare ones.
        listed = common * min(30, max(4, n // 4)) + rare[:n] * RARE_COUNT
        random.Random(n).shuffle(listed)  # a fixed order per size: the sample stays deterministic
        numbered = " ".join(f"{i}. {w}" for i, w in enumerate(listed, 1))
        return f"Below is a numbered list of words. Some of them appear more often than others.\n\n{numbered}"

    return Built(
        make_context=context,
        most=len(rare),
        question=f"What are the {COMMON_WORDS} most common words in the list above?",
        answer_prefix=f"The {COMMON_WORDS} words that appear most often in the list are:",
        answers=tuple(common),
        target=" " + ", ".join(common) + ".",
        max_new_tokens=50,
    )


def build_frequent_words(rng: random.Random, fmt: PromptFormat, length: int) -> Built:
    coded = list(dict.fromkeys(coded_word(rng) for _ in range(4000)))

    def context(n: int) -> str:
        # Word i (from 1) appears about 2n / i^2 times: the top three stand well apart.
        listed = [w for i, w in enumerate(coded[:n], 1) for _ in range(max(1, round(2 * n / i**2)))]
        random.Random(n).shuffle(listed)
        return "Read the following coded text and track how often each coded word appears.\n\n" + " ".join(listed)

    top = tuple(coded[:FREQUENT_WORDS])
    return Built(
        make_context=context,
        most=min(len(coded), length),
        question=f"What are the {FREQUENT_WORDS} most frequently appearing coded words in the text above?",
        answer_prefix=f"The {FREQUENT_WORDS} most frequent coded words are:",
        answers=top,
        target=" " + ", ".join(top) + ".",
        max_new_tokens=24,
    )
