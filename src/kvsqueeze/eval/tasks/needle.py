"""Needle in a haystack (Kamradt, "Needle In A Haystack - Pressure Testing LLMs",
github.com/gkamradt/LLMTest_NeedleInAHaystack): a passphrase hidden at a chosen
depth in Paul Graham essays; the model is asked for it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvsqueeze.data.haystack import NEEDLE, QUESTION, essay_tokens, essays_slice, hide
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample
from kvsqueeze.eval.tasks.base import TaskRequest, sample_rng

# Two plain words the model knows, so that a miss is the cache's fault, not the
# tokenizer's: sample i draws one colour and one object.
COLOURS = ("orange", "purple", "golden", "silver", "green", "crimson", "yellow", "violet")
OBJECTS = ("umbrella", "lantern", "giraffe", "bicycle", "teapot", "compass", "violin", "pineapple")
ANSWER_PREFIX = "The secret passphrase is"


@dataclass(frozen=True)
class NeedleTask:
    name: str = "needle"
    needs_lengths: bool = True

    def samples(self, fmt: PromptFormat, request: TaskRequest) -> Iterator[Sample]:
        total = len(essay_tokens(fmt.tokenizer))
        for length in request.lengths:
            for depth in request.depths:
                for index in range(request.samples):
                    rng = sample_rng(request.seed, self.name, length, depth, index)
                    passphrase = f"{rng.choice(COLOURS)} {rng.choice(OBJECTS)}"
                    offset = rng.randrange(max(1, total - length))
                    needle = NEEDLE.format(passphrase=passphrase)

                    def context(n: int, offset=offset, needle=needle, depth=depth) -> str:
                        return hide(essays_slice(fmt.tokenizer, n, offset), [(depth, needle)])

                    yield Sample(
                        task=self.name,
                        index=index,
                        length=length,
                        depth=depth,
                        context=fmt.fit(context, QUESTION, ANSWER_PREFIX, length, most=min(length, total - offset)),
                        question=QUESTION,
                        answers=(passphrase,),
                        metric="words_found",
                        max_new_tokens=12,
                        answer_prefix=ANSWER_PREFIX,
                        target=f" {passphrase}.",
                    )
