"""graded_answer gives what greedy decoding and a separate teacher-forced pass give:
the same answer tokens and the same target log-prob, whether the greedy answer
follows the target (or a draft) all the way, leaves it part way or at once, with and
without tokens fed before the answer."""

import pytest
import torch

from kvsqueeze.eval.answer import forced_logits, graded_answer, token_logprobs
from kvsqueeze.hf import use_kvsqueeze_attention
from kvsqueeze.hf.decode import greedy
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.tiny import tiny_model
from kvsqueeze.policy import make_policy

MAX_NEW = 6
STOP = {0}


def never(tokens: list[int]) -> bool:
    return False


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    prompt = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        record = record_prefill(model, prompt)
    return model, record


def reference(model, fresh, logits, lead: list[int], target: list[int]) -> tuple[list[int], float]:
    """The two passes graded_answer stands for."""
    cache = fresh()
    start = forced_logits(model, cache, logits, lead)[-1:]
    answer = greedy(model, cache, start, MAX_NEW, STOP, never)
    logprob = token_logprobs(model, fresh(), logits, lead + target)[len(lead) :]
    return answer, float(logprob.mean())


def off(tokens: list[int], follows: int) -> list[int]:
    """`tokens` with every token from index `follows` on changed."""
    return tokens[:follows] + [(t + 1) % 256 or 1 for t in tokens[follows:]]


def fresh_caches(model, record):
    """A function giving a new SnapKV keep-0.5 cache of the recorded prompt per call."""
    policy = make_policy("snapkv", keep=0.5)
    return lambda: record.cache(model, policy)


@pytest.mark.parametrize("lead", [[], [17, 42, 99]])
@pytest.mark.parametrize("follows", [MAX_NEW, 3, 0])  # target tokens the greedy answer matches
@pytest.mark.parametrize(
    "drafts",  # as functions of the greedy answer
    [
        lambda answer: [],
        lambda answer: [off(answer, 0), answer],
        lambda answer: [off(answer, 1), off(answer, 4)],
    ],
    ids=["no-drafts", "right-draft", "drafts-part-right"],
)
def test_graded_answer_matches_greedy_and_teacher_forcing(setup, lead, follows, drafts):
    model, record = setup
    fresh = fresh_caches(model, record)
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        greedy_answer, _ = reference(model, fresh, record.last_logits, lead, [])
        assert len(greedy_answer) == MAX_NEW  # no early stop: every case below is what its name says
        target = off(greedy_answer, follows)
        expected_answer, expected_logprob = reference(model, fresh, record.last_logits, lead, target)
        answer, logprob = graded_answer(
            model, fresh(), record.last_logits, lead, target, drafts(greedy_answer), MAX_NEW, STOP, never
        )
    assert answer == expected_answer == greedy_answer
    assert logprob == pytest.approx(expected_logprob, abs=1e-5)


@pytest.mark.parametrize(
    "target_follows, drafts, forwards",
    [
        (MAX_NEW, lambda answer: [], 1),  # the target forward gives the whole answer
        (0, lambda answer: [off(answer, 0), answer], 2),  # then the right draft's
        (0, lambda answer: [], MAX_NEW),  # the target's, then greedy's: one per answer token but the last
    ],
)
def test_a_right_guess_costs_one_forward(setup, target_follows, drafts, forwards):
    model, record = setup
    fresh = fresh_caches(model, record)
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        greedy_answer, _ = reference(model, fresh, record.last_logits, [], [])
        calls = []
        hook = model.register_forward_hook(lambda *args: calls.append(1))
        try:
            args = (off(greedy_answer, target_follows), drafts(greedy_answer), MAX_NEW, STOP, never)
            answer, _ = graded_answer(model, fresh(), record.last_logits, [], *args)
        finally:
            hook.remove()
    assert answer == greedy_answer
    assert len(calls) == forwards
