"""Every metric on fixed inputs: right answers score 1, wrong ones 0, partial ones
in between where the metric is graded."""

import pytest

from kvsqueeze.eval import longbench_metrics as lb
from kvsqueeze.eval.metrics import score


def test_words_found_is_graded_by_word():
    assert score("words_found", " orange umbrella.", ("orange umbrella",)) == 1.0
    assert score("words_found", "It is Orange, UMBRELLA", ("orange umbrella",)) == 1.0
    assert score("words_found", " orange.", ("orange umbrella",)) == 0.5
    assert score("words_found", " purple lantern", ("orange umbrella",)) == 0.0


def test_string_match_all_counts_each_reference():
    refs = ("1234567", "7654321", "1111111", "2222222")
    assert score("string_match_all", "1234567, 7654321, 1111111 and 2222222", refs) == 1.0
    assert score("string_match_all", "1234567 and 2222222", refs) == 0.5
    assert score("string_match_all", "no numbers here", refs) == 0.0
    assert score("string_match_all", "ABCDE", ("abcde",)) == 1.0


def test_qa_f1():
    assert score("qa_f1", "Bergen.", ("Bergen",)) == 1.0
    assert score("qa_f1", "The answer is Paris", ("Bergen",)) == 0.0
    # precision 1/2, recall 1 -> F1 2/3; articles and punctuation ignored
    assert score("qa_f1", "the city of Bergen", ("Bergen city",)) == pytest.approx(0.8)
    assert lb.qa_f1_score("new york", "New York City") == pytest.approx(0.8)
    assert score("qa_f1", "Oslo", ("Bergen", "Oslo")) == 1.0  # best of the references


def test_rouge_l():
    ref = "leaking reservoirs lose water"
    assert score("rouge", ref, (ref,)) == pytest.approx(1.0)
    assert score("rouge", "a fox hunts at night", (ref,)) == 0.0
    assert 0.0 < score("rouge", "reservoirs lose a lot", (ref,)) < 1.0
    assert score("rouge", "", (ref,)) == 0.0


def test_classification():
    classes = ("Human being", "City", "Country")
    assert score("classification", "City", ("City",), classes) == 1.0
    assert score("classification", "Country", ("City",), classes) == 0.0
    assert score("classification", "City or Country", ("City",), classes) == 0.5
    # a class that is only part of the reference's name is not counted against it
    assert (
        lb.classification_score(
            "Distance, linear measure", "Distance, linear measure", ("Distance", "Distance, linear measure")
        )
        == 1.0
    )


def test_retrieval_and_count():
    assert score("retrieval", "Paragraph 2", ("Paragraph 2",)) == 1.0
    assert score("retrieval", "Paragraph 3", ("Paragraph 2",)) == 0.0
    assert score("retrieval", "2 or 3", ("Paragraph 2",)) == 0.5
    assert score("retrieval", "no idea", ("Paragraph 2",)) == 0.0
    assert score("retrieval_zh", "段落4", ("段落4",)) == 1.0
    assert score("count", "There are 2 unique paragraphs.", ("2",)) == 1.0
    assert score("count", "3", ("2",)) == 0.0
    assert score("count", "2 or maybe 4", ("2",)) == 0.5


def test_code_similarity_skips_comments_and_fences():
    ref = "    return width * height"
    assert score("code_sim", "```python\n# compute\n    return width * height\n", (ref,)) == 1.0
    assert score("code_sim", "zzzz", (ref,)) < 0.2
    assert 0.5 < score("code_sim", "    return width * h", (ref,)) < 1.0
