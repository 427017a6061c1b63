"""ChunkKV keeps or drops contiguous chunks whole: on a hand-made pattern where the
question attends to the first and last tokens of an answer, token scores drop the
middle of the answer and chunk scores keep it."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.policy import Policy, ScoreInput, make_policy
from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.score import SCORERS, ChunkKVScorer, SnapKVScorer

T = 24


def answer_pattern(valid: torch.Tensor | None = None) -> ScoreInput:
    """One head, keys e_0..e_23, scaling 1, window 2 (tokens 22, 23). The window's
    queries attend to tokens 10 and 13 (the ends of a 4-token answer 10..13) with
    logit 4, and nothing else stands out."""
    keys = torch.eye(T)[None, None]
    queries = torch.zeros(1, 1, T, T)
    queries[0, 0, -2:, 10] = 4.0
    queries[0, 0, -2:, 13] = 4.0
    valid = torch.ones(1, T, dtype=torch.bool) if valid is None else valid
    return ScoreInput(queries, keys, keys.clone(), valid, scaling=1.0, window=2)


def test_chunks_are_scored_by_their_mean_and_aligned_to_the_end():
    x = answer_pattern()
    token = SnapKVScorer(pool="none")(x)[0, 0]
    scores = ChunkKVScorer(chunk=4)(x)[0, 0]
    # Chunks of 4 from the end: [20, 24), [16, 20), [12, 16), [8, 12), [4, 8), [0, 4).
    for start in range(0, T, 4):
        torch.testing.assert_close(scores[start : start + 4], token[start : start + 4].mean().expand(4))


def test_chunkkv_keeps_the_middle_of_an_answer_token_scores_drop():
    x = answer_pattern()
    budget = Budget(tokens=10)  # window 2 + 8 chosen
    by_token = Policy("snapkv", SnapKVScorer(pool="none"), budget=budget, window=2).keep_mask(x, 0, 1)[0, 0]
    by_chunk = Policy("chunkkv", ChunkKVScorer(chunk=4), budget=budget, window=2).keep_mask(x, 0, 1)[0, 0]
    assert by_token[10] and by_token[13] and not by_token[11] and not by_token[12]
    # With chunk 4 the answer straddles chunks [8, 12) and [12, 16): both are kept whole.
    assert bool(by_chunk[8:16].all())
    assert int(by_chunk.sum()) == 10


def test_chunk_means_count_only_real_tokens():
    valid = torch.ones(1, T, dtype=torch.bool)
    valid[0, :6] = False  # left padding: chunk [4, 8) has two real tokens
    x = answer_pattern(valid)
    token = SnapKVScorer(pool="none")(x)[0, 0]
    scores = ChunkKVScorer(chunk=4)(x)[0, 0]
    torch.testing.assert_close(scores[6:8], token[6:8].mean().expand(2))
    assert ChunkKVScorer(chunk=T + 5)(x).shape == (1, 1, T)  # one partial chunk


def test_chunkkv_is_registered_and_rejects_a_bad_chunk():
    assert SCORERS["chunkkv"] is ChunkKVScorer
    assert isinstance(make_policy("ada-chunkkv", keep=0.5).scorer, ChunkKVScorer)
    with pytest.raises(ValueError, match="chunk"):
        ChunkKVScorer(chunk=0)
