"""The sweep: samples x policies x budgets, resumable, in process or on Ray.

Re-running with the same arguments skips every row already in results.jsonl; a
sample whose rows are all there is not even prefilled. Rows are keyed by every
setting that changes them (eval/config.py), so other settings add rows. Samples,
greedy decoding and the random scorer are all seeded, so a rerun gives the same
rows.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.eval.config import EvalConfig
from kvsqueeze.eval.evaluate import budget_fields
from kvsqueeze.eval.results import append_rows, read_rows, row_key
from kvsqueeze.eval.tasks import TaskRequest, get_task
from kvsqueeze.eval.unit import Unit, loaded, run_unit, unit_fields
from kvsqueeze.hf.models import max_context

RESULTS = "results.jsonl"


def plan(config: EvalConfig, done: set[tuple]) -> Iterator[Unit]:
    """The units still to run, each with the policies its sample lacks."""
    model, fmt = loaded(config.model, config.dtype, config.device)
    limit = max_context(model)
    for length in config.lengths:  # fail before building any sample; the answer's room is checked per sample
        if length > limit:
            raise KVSqueezeError(f"length {length} is longer than {config.model} allows ({limit} positions)")
    request = TaskRequest(config.lengths, config.depths, config.samples, config.seed, config.data)
    grid = config.policy_grid()
    for sample in get_task(config.task).samples(fmt, request):
        if sample.length + sample.max_new_tokens > limit:
            raise KVSqueezeError(
                f"{sample.task} sample {sample.index}: {sample.length} prompt tokens are more than "
                f"{config.model} allows ({limit} positions)"
            )
        fields = unit_fields(config, sample)
        todo = tuple(
            i
            for i, policy in enumerate(grid)
            if row_key({**fields, "policy": policy.name, **budget_fields(policy)}) not in done
        )
        if todo:
            yield Unit(sample, todo)


def run_eval(config: EvalConfig, ray_address: str | None = None) -> Path:
    """Run what is missing of the sweep, rewriting the reports after every sample;
    returns results.jsonl. `ray_address`: None runs in this process, "local" starts
    Ray here, else a cluster. Ctrl-C says what was saved, then propagates."""
    from kvsqueeze.eval.report import write_reports

    config.validate()
    results = config.out / RESULTS
    done = {row_key(row) for row in read_rows(results)}
    units = list(plan(config, done))  # builds every sample first: bad input fails before any row runs
    try:
        for rows in _finished(config, units, ray_address):
            append_rows(results, rows)
            write_reports(read_rows(results), config.out, new=rows)
        if not units:  # nothing ran, but a report may still be missing or stale
            write_reports(read_rows(results), config.out)
    except KeyboardInterrupt:
        saved = len(read_rows(results))
        print(f"\n{saved} rows saved in {config.out}; rerun the same command to resume", file=sys.stderr)
        raise
    return results


def _finished(config: EvalConfig, units: list[Unit], ray_address: str | None) -> Iterator[list[dict]]:
    """Each unit's rows as it finishes."""
    if ray_address is None:
        for unit in tqdm(units, desc=f"eval {config.task}", unit="sample"):
            yield run_unit(config, unit)
    else:
        from kvsqueeze.eval.ray_runner import run_units_on_ray

        yield from tqdm(run_units_on_ray(config, units, ray_address), total=len(units), desc="eval on ray")
