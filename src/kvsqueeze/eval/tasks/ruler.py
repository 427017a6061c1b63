"""RULER-style synthetic tasks (Hsieh et al., arXiv 2404.06654), generated locally
from a seed: eight subtasks, each sized to the requested prompt length and scored
by the fraction of expected strings the answer contains."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample
from kvsqueeze.eval.tasks.base import TaskRequest, sample_rng
from kvsqueeze.eval.tasks.ruler_aggregation import build_common_words, build_frequent_words
from kvsqueeze.eval.tasks.ruler_build import Built
from kvsqueeze.eval.tasks.ruler_niah import SPECS, build_niah
from kvsqueeze.eval.tasks.ruler_tracking import build_variable_tracking

SUBTASKS: dict[str, Callable[..., Built]] = {
    **{name: functools.partial(build_niah, spec) for name, spec in SPECS.items()},
    "variable_tracking": build_variable_tracking,
    "common_words": build_common_words,
    "frequent_words": build_frequent_words,
}


@dataclass(frozen=True)
class RulerTask:
    name: str = "ruler"
    needs_lengths: bool = True

    def samples(self, fmt: PromptFormat, request: TaskRequest) -> Iterator[Sample]:
        for subtask, build in SUBTASKS.items():
            for length in request.lengths:
                for index in range(request.samples):
                    built = build(sample_rng(request.seed, self.name, subtask, length, index), fmt, length)
                    yield Sample(
                        task=f"{self.name}/{subtask}",
                        index=index,
                        length=length,
                        depth=None,
                        context=fmt.fit(built.make_context, built.question, built.answer_prefix, length, built.most),
                        question=built.question,
                        answers=built.answers,
                        metric="string_match_all",
                        max_new_tokens=built.max_new_tokens,
                        answer_prefix=built.answer_prefix,
                        target=built.target,
                    )
