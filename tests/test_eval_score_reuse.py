"""A sample's sweep over policies and budgets scores its prompt once per scorer: the
KVzip reconstruction runs once, and the KVzip and H2O scorers once per layer, shared by
the uniform, Ada-KV and cross-layer variants at every budget. The rows equal those of
each policy evaluated alone, on a record and scores of its own."""

from __future__ import annotations

import pytest

import kvsqueeze.hf.kvzip as hf_kvzip
from kvsqueeze.eval.evaluate import evaluate_sample
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample
from kvsqueeze.hf.tiny import byte_tokenizer, tiny_model
from kvsqueeze.policy import make_policy
from kvsqueeze.policy.score import H2OScorer, KVzipScorer

LAYERS = 2
NAMES = ["kvzip", "ada-kvzip", "cross-kvzip", "h2o", "ada-h2o"]
SAMPLE = Sample(
    task="needle",
    index=0,
    length=200,
    depth=0.5,
    context="The sky is blue and the grass is green. " * 3 + "The passphrase is red fox. " + "Rain falls. " * 4,
    question="What is the passphrase?",
    answers=("red fox",),
    metric="words_found",
    max_new_tokens=4,
    answer_prefix="The passphrase is",
    target=" red fox.",
)


def counted(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """Replace owner.name by a wrapper that counts its calls; returns the counter."""
    calls = [0]
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.mark.parametrize("question_agnostic", [False, True])
def test_each_scorer_runs_once_per_layer_for_all_policies_and_budgets(monkeypatch, question_agnostic):
    model, fmt = tiny_model("llama", num_layers=LAYERS), PromptFormat(byte_tokenizer())
    policies = [make_policy("full")] + [make_policy(name, keep=keep) for name in NAMES for keep in (0.2, 0.5)]
    alone = [evaluate_sample(model, fmt, SAMPLE, [policy], question_agnostic)[0] for policy in policies]
    reconstructions = counted(monkeypatch, hf_kvzip, "reconstruct")
    kvzip_calls = counted(monkeypatch, KVzipScorer, "__call__")
    h2o_calls = counted(monkeypatch, H2OScorer, "__call__")
    rows = evaluate_sample(model, fmt, SAMPLE, policies, question_agnostic)
    assert (reconstructions[0], kvzip_calls[0], h2o_calls[0]) == (1, LAYERS, LAYERS)
    for row, single in zip(rows, alone, strict=True):
        assert row["kept_tokens_per_head"] == single["kept_tokens_per_head"]
        assert (row["prediction"], row["score"], row["kv_bytes_stored"]) == (
            single["prediction"],
            single["score"],
            single["kv_bytes_stored"],
        )
        assert row["answer_logprob"] == pytest.approx(single["answer_logprob"], abs=1e-4)
    assert len({str(row["kept_tokens_per_head"]) for row in rows}) > len(NAMES)  # the budgets keep different tokens
