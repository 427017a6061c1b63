"""The same units as Ray tasks: local Ray, or a cluster at an address. Each worker
loads the model once and keeps it; rows come back to the driver, which alone
writes results.jsonl."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.eval.config import EvalConfig
from kvsqueeze.eval.unit import Unit, run_unit


def run_units_on_ray(config: EvalConfig, units: list[Unit], address: str) -> Iterator[list[dict]]:
    """Rows of each unit as it finishes (in completion order)."""
    try:
        import ray
    except ImportError:
        raise KVSqueezeError("--ray needs Ray: pip install 'kvsqueeze[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False)
    # Workers use the driver's thread count, so their arithmetic (and rows) match a local run.
    pinned = config if config.threads else replace(config, threads=torch.get_num_threads())
    remote = ray.remote(num_cpus=1)(run_unit)
    pending = [remote.remote(pinned, unit) for unit in units]
    while pending:
        finished, pending = ray.wait(pending, num_returns=1)
        yield ray.get(finished[0])
