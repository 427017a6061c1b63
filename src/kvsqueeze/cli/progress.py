"""A progress bar over policies that names the one being run: a policy can take
minutes, and "policies 1/4" alone does not say which one is slow."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvsqueeze.policy import Policy


def policy_progress(policies: Sequence[Policy], console: Console | None = None) -> Iterator[Policy]:
    """Yield each policy while the bar shows "policy NAME" and how many are done."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("policies", total=len(policies))
        for policy in policies:
            progress.update(task, description=f"policy {policy.name}", refresh=True)
            yield policy
            progress.advance(task)
