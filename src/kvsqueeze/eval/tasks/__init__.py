"""Evaluation tasks by name."""

from __future__ import annotations

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.eval.tasks.base import Task, TaskRequest
from kvsqueeze.eval.tasks.longbench import LongBenchTask
from kvsqueeze.eval.tasks.needle import NeedleTask
from kvsqueeze.eval.tasks.ppl import PerplexityTask
from kvsqueeze.eval.tasks.ruler import RulerTask

TASKS: dict[str, Task] = {t.name: t for t in (NeedleTask(), RulerTask(), PerplexityTask(), LongBenchTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KVSqueezeError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Task", "TaskRequest", "get_task"]
