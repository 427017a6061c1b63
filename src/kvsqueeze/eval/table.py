"""Grouping result rows into the cells that tables and plots show."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

MODES = {False: "question-aware", True: "question-agnostic"}


def family(task: str) -> str:
    """ "ruler/niah_multikey" -> "ruler"."""
    return task.split("/", 1)[0]


def budget_label(row: dict) -> str:
    if row["policy"] == "full":
        return "full"
    return f"keep={row['keep']:g}" if row.get("keep") is not None else f"tokens={row['tokens']}"


def budget_value(row: dict) -> float:
    return row["keep"] if row.get("keep") is not None else row["tokens"]


def mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def grouped(rows: Iterable[dict], key: Callable[[dict], object]) -> dict:
    groups: dict = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return dict(groups)


def ordered_budgets(rows: Iterable[dict]) -> list[str]:
    compressed = {budget_label(r): budget_value(r) for r in rows if r["policy"] != "full"}
    return sorted(compressed, key=compressed.get)


def ordered_policies(rows: Iterable[dict]) -> list[str]:
    names = list(dict.fromkeys(r["policy"] for r in rows))
    return sorted(names, key=lambda n: (n != "full", names.index(n)))
