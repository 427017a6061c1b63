"""The per-dataset metrics of LongBench (Bai et al., "LongBench: A Bilingual,
Multitask Benchmark for Long Context Understanding", arXiv 2308.14508), written
from its description: QA F1 over normalized words, ROUGE-L, classification
accuracy among the dataset's classes, paragraph-retrieval accuracy, count accuracy
and code edit similarity. Each scores one prediction against one reference."""

from __future__ import annotations

import re
import string
from collections import Counter

from rapidfuzz import fuzz
from rouge_score import rouge_scorer

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ROUGE = rouge_scorer.RougeScorer(["rougeL"])


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def qa_f1_score(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l_score(prediction: str, reference: str) -> float:
    if not prediction.strip() or not reference.strip():
        return 0.0
    return _ROUGE.score(reference, prediction)["rougeL"].fmeasure


def classification_score(prediction: str, reference: str, all_classes: tuple[str, ...]) -> float:
    """1/k when the prediction names the reference class among k classes it names;
    a named class that is only part of the reference's name does not count."""
    named = [c for c in all_classes if c in prediction]
    named = [c for c in named if not (c in reference and c != reference)]
    return 1.0 / len(named) if reference in named else 0.0


def _numbers_matching(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str) -> float:
    """The reference is "Paragraph N": the share of numbers in the prediction that are N."""
    found = re.findall(r"Paragraph (\d+)", reference)
    return _numbers_matching(prediction, found[0]) if found else 0.0


def retrieval_zh_score(prediction: str, reference: str) -> float:
    found = re.findall(r"段落(\d+)", reference)
    return _numbers_matching(prediction, found[0]) if found else 0.0


def count_score(prediction: str, reference: str) -> float:
    return _numbers_matching(prediction, str(reference).strip())


def code_sim_score(prediction: str, reference: str) -> float:
    """Edit similarity of the first line of code in the prediction (comments and
    fences skipped) to the reference line."""
    lines = [line for line in prediction.lstrip("\n").split("\n") if not line.lstrip().startswith(("`", "#", "//"))]
    first = lines[0] if lines else ""
    return fuzz.ratio(first, reference) / 100.0
