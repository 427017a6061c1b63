"""A unit of work: one sample under the policies it still lacks rows for. Units are
what the local and the Ray runner both execute, so both give the same rows."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from kvsqueeze.eval.config import EvalConfig
from kvsqueeze.eval.evaluate import evaluate_sample
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample


@dataclass(frozen=True)
class Unit:
    sample: Sample
    policies: tuple[int, ...]  # indices into config.policy_grid()


def unit_fields(config: EvalConfig, sample: Sample) -> dict:
    """What every row of this sample starts with: the run's settings and the sample."""
    return {
        **config.settings(),
        "task": sample.task,
        "sample": sample.index,
        "length": sample.length,
        "depth": sample.depth,
    }


@cache
def loaded(model: str, dtype: str, device: str):
    """The model and its prompt format, once per process (a Ray worker keeps it)."""
    from kvsqueeze.hf.models import load_model

    mdl, tokenizer = load_model(model, getattr(torch, dtype), device)
    return mdl, PromptFormat(tokenizer)


def run_unit(config: EvalConfig, unit: Unit) -> list[dict]:
    if config.threads:
        torch.set_num_threads(config.threads)
    model, fmt = loaded(config.model, config.dtype, config.device)
    grid = config.policy_grid()
    policies = [grid[i] for i in unit.policies]
    rows = evaluate_sample(model, fmt, unit.sample, policies, config.question_agnostic, config.quant())
    return [{**unit_fields(config, unit.sample), **row} for row in rows]
