"""One evaluation sample: a prompt, what a right answer is, and how to score it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """A context, a question asked after it, and the references.

    `answer_prefix` starts the model's answer (RULER-style), `target` is the text a
    perfect answer continues it with (its log-likelihood is a graded score that does
    not depend on greedy decoding). For `ppl`, `continuation` is the text whose
    perplexity is measured and there is no question.
    """

    task: str  # "needle", "ruler/niah_multikey", "ppl", "longbench/qasper", ...
    index: int
    length: int  # the prompt length this sample was built for, in tokens
    depth: float | None
    context: str
    question: str
    answers: tuple[str, ...]
    metric: str  # a name in eval.metrics.METRICS, or "perplexity"
    max_new_tokens: int
    answer_prefix: str = ""
    target: str = ""
    all_classes: tuple[str, ...] = ()
    continuation: str = ""
    single_line: bool = True  # the answer ends at its first line break (short-answer tasks)
