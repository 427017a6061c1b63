"""Perplexity of a long document's continuation when the cache of its first part
was compressed: a graded, decoding-free measure of what eviction loses."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from kvsqueeze.data.haystack import essay_tokens
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample
from kvsqueeze.eval.tasks.base import TaskRequest, sample_rng

CONTINUATION_TOKENS = 256


@dataclass(frozen=True)
class PerplexityTask:
    """`length` tokens of essays: the last min(256, length/4) are the continuation."""

    name: str = "ppl"
    needs_lengths: bool = True

    def samples(self, fmt: PromptFormat, request: TaskRequest) -> Iterator[Sample]:
        ids = essay_tokens(fmt.tokenizer)
        for length in request.lengths:
            tail = min(CONTINUATION_TOKENS, length // 4)
            for index in range(request.samples):
                start = sample_rng(request.seed, self.name, length, index).randrange(max(1, len(ids) - length))
                head = fmt.tokenizer.decode(ids[start : start + length - tail])
                yield Sample(
                    task=self.name,
                    index=index,
                    length=length,
                    depth=None,
                    context=head,
                    question="",
                    answers=(),
                    metric="perplexity",
                    max_new_tokens=0,
                    continuation=fmt.tokenizer.decode(ids[start + length - tail : start + length]),
                )
