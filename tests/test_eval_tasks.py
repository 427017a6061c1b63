"""Task generators on a byte tokenizer: prompts fit the requested length, hold what
is asked about, are reproducible from the seed, and their references score 1."""

from pathlib import Path

import pytest

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.eval.metrics import score
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.tasks import TaskRequest, get_task
from kvsqueeze.eval.tasks.longbench import read_jsonl
from kvsqueeze.eval.tasks.ruler import SUBTASKS
from kvsqueeze.hf.tiny import byte_tokenizer

DATA = Path(__file__).parent / "data" / "longbench_sample.jsonl"


@pytest.fixture(scope="module")
def fmt():
    return PromptFormat(byte_tokenizer())


def samples(fmt, task, lengths=(1500,), depths=(0.5,), n=1, seed=0, data=None):
    return list(get_task(task).samples(fmt, TaskRequest(lengths, depths, n, seed, data)))


def test_needle_fits_and_hides_the_passphrase(fmt):
    got = samples(fmt, "needle", lengths=(800, 1500), depths=(0.0, 0.5, 1.0), n=2)
    assert len(got) == 2 * 3 * 2
    for s in got:
        assert s.length - 40 <= fmt.count(s.context, s.question, s.answer_prefix) <= s.length
        assert f"The secret passphrase is {s.answers[0]}." in s.context
        assert score(s.metric, s.target, s.answers) == 1.0
        assert score(s.metric, " no idea", s.answers) == 0.0
    at_start = next(s for s in got if s.depth == 0.0)
    at_end = next(s for s in got if s.depth == 1.0)
    assert at_start.context.startswith("The secret passphrase")
    assert at_end.context.endswith(f"{at_end.answers[0]}.")


def test_samples_are_reproducible_and_vary(fmt):
    first, again = samples(fmt, "needle", n=3, seed=7), samples(fmt, "needle", n=3, seed=7)
    assert first == again
    assert len({s.context for s in first}) == 3
    assert samples(fmt, "needle", n=1, seed=8)[0].context != first[0].context


@pytest.mark.parametrize("subtask", sorted(SUBTASKS))
def test_ruler_subtask(fmt, subtask):
    got = [s for s in samples(fmt, "ruler", lengths=(2000,)) if s.task == f"ruler/{subtask}"]
    assert len(got) == 1
    s = got[0]
    assert fmt.count(s.context, s.question, s.answer_prefix) <= 2000
    assert score(s.metric, s.target, s.answers) == 1.0
    assert score(s.metric, " nothing relevant", s.answers) == 0.0
    if len(s.answers) > 1:  # graded: half the answers, half the score
        half = ", ".join(s.answers[: len(s.answers) // 2])
        assert score(s.metric, half, s.answers) == pytest.approx((len(s.answers) // 2) / len(s.answers))


def test_needles_never_cut_a_word():
    from kvsqueeze.data.haystack import hide

    text = "alpha beta gamma. delta epsilon zeta. eta theta iota"
    assert hide(text, [(0.1, "NEEDLE.")]) == "alpha beta gamma. NEEDLE. delta epsilon zeta. eta theta iota"
    assert hide(text, [(0.75, "NEEDLE.")]) == "alpha beta gamma. delta epsilon zeta. NEEDLE. eta theta iota"
    assert hide(text, [(0.0, "A."), (1.0, "B.")]) == f"A. {text} B."
    assert hide("no boundary at all", [(0.5, "N.")]) == "no N. boundary at all"


def test_ruler_answers_are_in_the_context(fmt):
    by_task = {s.task: s for s in samples(fmt, "ruler", lengths=(2500,))}
    for name in ("niah_single_numeric", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking"):
        s = by_task[f"ruler/{name}"]
        assert all(a in s.context for a in s.answers), name
    multikey = by_task["ruler/niah_multikey"]
    assert multikey.context.count("special magic numbers for") == 4  # one asked, three distractors
    common = by_task["ruler/common_words"]
    listed = common.context.split()
    for word in common.answers:  # each common word outnumbers every other word
        assert listed.count(word) > 3
    frequent = by_task["ruler/frequent_words"]
    counts = sorted(((frequent.context.split().count(w), w) for w in set(frequent.context.split()[13:])), reverse=True)
    assert {w for _, w in counts[:3]} == set(frequent.answers)


def test_ppl_splits_a_document(fmt):
    (s,) = samples(fmt, "ppl", lengths=(1200,))
    assert s.metric == "perplexity" and s.question == ""
    assert len(fmt.tokens(s.continuation)) == 256
    assert len(fmt.tokens(s.context)) == 1200 - 256


def test_longbench_sample_file(fmt):
    got = samples(fmt, "longbench", lengths=(), data=DATA, n=5)
    assert {s.task for s in got} == {
        "longbench/hotpotqa",
        "longbench/gov_report",
        "longbench/trec",
        "longbench/passage_retrieval_en",
        "longbench/passage_count",
        "longbench/lcc",
    }
    for s in got:
        assert score(s.metric, s.answers[0], s.answers, s.all_classes) == pytest.approx(1.0), s.task
        assert s.length == fmt.count(s.context, s.question, s.answer_prefix)


def test_longbench_truncates_the_middle_to_a_length(fmt):
    (s,) = [s for s in samples(fmt, "longbench", lengths=(250,), data=DATA) if s.task == "longbench/hotpotqa"]
    assert fmt.count(s.context, s.question, s.answer_prefix) <= 250
    assert s.context.startswith("Passage 1") and s.context.endswith("second shop.")
    assert "1998" not in s.context  # the middle went


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no samples"),
        ("\n\n", "holds no samples"),
        ('{"dataset": "hotpotqa"', "line 1: not valid JSON"),
        ('{"context": "c", "input": "q", "answers": ["a"], "dataset": "qasper"}\n[1, 2]', "line 2: expected a JSON"),
        ('{"context": "c", "input": "q", "dataset": "qasper"}', "missing field 'answers'"),
        ('{"context": "c", "input": "q", "answers": [], "dataset": "qasper"}', "non-empty list"),
        ('{"context": "c", "input": "q", "answers": ["a"], "dataset": "mystery"}', "unknown LongBench dataset"),
        ('{"context": "c", "input": "q", "answers": ["a"], "dataset": "dureader"}', "word segmentation"),
    ],
)
def test_bad_longbench_files(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(KVSqueezeError, match=message):
        read_jsonl(path)


def test_unknown_task():
    with pytest.raises(KVSqueezeError, match="unknown task 'haystack'"):
        get_task("haystack")


def test_length_too_short_for_the_task(fmt):
    with pytest.raises(KVSqueezeError, match="too short"):
        samples(fmt, "needle", lengths=(50,))
