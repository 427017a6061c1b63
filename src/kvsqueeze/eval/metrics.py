"""Scores of a prediction against references, each in [0, 1], higher is better.

RULER-style tasks use `string_match_all` (the fraction of references found in the
prediction); the needle uses `words_found`, graded by word so that a half-recalled
passphrase scores 0.5. The LongBench metrics live in eval/longbench_metrics.py and
are registered here under LongBench's names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from kvsqueeze.eval import longbench_metrics as lb

Metric = Callable[[str, tuple[str, ...], tuple[str, ...]], float]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def words_found(prediction: str, answers: tuple[str, ...], all_classes: tuple[str, ...] = ()) -> float:
    """Best over references of the fraction of the reference's words that the
    prediction contains."""
    said = set(words(prediction))
    return max((sum(w in said for w in words(a)) / len(words(a)) for a in answers if words(a)), default=0.0)


def string_match_all(prediction: str, answers: tuple[str, ...], all_classes: tuple[str, ...] = ()) -> float:
    """Fraction of the references that appear in the prediction (case-insensitive)."""
    said = prediction.lower()
    return sum(a.lower() in said for a in answers) / len(answers) if answers else 0.0


def best_of(metric: Callable[[str, str], float]) -> Metric:
    """A one-reference metric scored against every reference, keeping the best."""

    def score(prediction: str, answers: tuple[str, ...], all_classes: tuple[str, ...] = ()) -> float:
        return max((metric(prediction, a) for a in answers), default=0.0)

    return score


def classification(prediction: str, answers: tuple[str, ...], all_classes: tuple[str, ...] = ()) -> float:
    return max((lb.classification_score(prediction, a, all_classes) for a in answers), default=0.0)


METRICS: dict[str, Metric] = {
    "words_found": words_found,
    "string_match_all": string_match_all,
    "qa_f1": best_of(lb.qa_f1_score),
    "rouge": best_of(lb.rouge_l_score),
    "classification": classification,
    "retrieval": best_of(lb.retrieval_score),
    "retrieval_zh": best_of(lb.retrieval_zh_score),
    "count": best_of(lb.count_score),
    "code_sim": best_of(lb.code_sim_score),
}


def score(metric: str, prediction: str, answers: tuple[str, ...], all_classes: tuple[str, ...] = ()) -> float:
    return float(METRICS[metric](prediction, answers, all_classes))
