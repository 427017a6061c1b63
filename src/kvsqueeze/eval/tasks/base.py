"""What a task is: a generator of samples for the requested lengths and depths."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample


@dataclass(frozen=True)
class TaskRequest:
    """The slice of the grid a task builds samples for."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    seed: int
    data: Path | None = None


class Task(Protocol):
    name: str
    needs_lengths: bool  # False: the data sets its own lengths (LongBench without --lengths)

    def samples(self, fmt: PromptFormat, request: TaskRequest) -> Iterator[Sample]: ...


def sample_rng(seed: int, *parts: object) -> random.Random:
    """A generator seeded by the seed and the sample's coordinates: a sample does not
    change when other samples are added or removed from the grid."""
    return random.Random("/".join(str(p) for p in (seed, *parts)))
