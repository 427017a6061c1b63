"""The engine's sampler: greedy rows take the first maximum (as argmax does), sampled
rows draw from their own generator, whatever else is in the batch."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.engine.sampler import sample
from kvsqueeze.engine.sampling_params import SamplingParams


def test_greedy_rows_take_the_first_of_tied_maxima():
    logits = torch.full((3, 1000), -5.0)
    logits[0, [7, 400, 999]] = 2.0  # a three-way tie: the first wins
    logits[1, 999] = 3.0
    logits[2, [0, 1]] = 1.0
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, [greedy] * 3, [None] * 3) == [7, 999, 0]
    random = torch.randn(16, 49152, generator=torch.Generator().manual_seed(0))
    assert sample(random, [greedy] * 16, [None] * 16) == random.argmax(dim=-1).tolist()


def test_a_seeded_row_draws_the_same_token_beside_greedy_rows():
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(temperature=1.0, seed=3)
    greedy = SamplingParams(temperature=0.0)

    alone = sample(logits[2:3], [seeded], [torch.Generator().manual_seed(3)])[0]
    mixed = sample(logits, [greedy, greedy, seeded, greedy], [None, None, torch.Generator().manual_seed(3), None])
    assert mixed[2] == alone
    assert mixed[:2] + mixed[3:] == [int(logits[i].argmax()) for i in (0, 1, 3)]


def test_a_vanishing_temperature_is_greedy_and_a_non_finite_one_is_refused():
    # Found by the API fuzz test: 4.6e-290 overflowed the logits to inf and the draw failed.
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(2))
    tiny = SamplingParams(temperature=4.55e-290)
    assert tiny.greedy
    assert sample(logits, [tiny] * 2, [None] * 2) == logits.argmax(dim=-1).tolist()
    assert not SamplingParams(temperature=1e-3).greedy
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            SamplingParams(temperature=bad)
