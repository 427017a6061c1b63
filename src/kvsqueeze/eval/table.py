"""Grouping result rows into the cells that tables and plots show."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kvsqueeze.eval.config import SETTINGS

MODES = {False: "question-aware", True: "question-agnostic"}
# Settings that split a model's rows into separately reported parts; the model and
# the mode are split on already (a report per model, a section per mode).
SPLIT_SETTINGS = tuple(s for s in SETTINGS if s not in ("model", "question_agnostic"))


@dataclass(frozen=True)
class Part:
    """Rows that may be averaged together: one model, task family, mode, and one value
    of every other setting."""

    family: str
    agnostic: bool
    settings: str  # the settings that tell this part from the model's others ("window=16"), or ""
    rows: list[dict]


def varying_settings(rows: list[dict]) -> list[str]:
    """Settings whose value differs between these rows (of one model)."""
    return [name for name in SPLIT_SETTINGS if len({r[name] for r in rows}) > 1]


def shared_settings(rows: list[dict]) -> str:
    """The settings all these rows (of one model) share, as "name=value, ..."."""
    varying = varying_settings(rows)
    return ", ".join(f"{name}={rows[0][name]}" for name in SPLIT_SETTINGS if name not in varying)


def parts(rows: list[dict]) -> list[Part]:
    """One model's rows split into parts: never average across a part boundary."""
    names = varying_settings(rows)
    groups = grouped(rows, lambda r: (family(r["task"]), r["question_agnostic"], tuple(r[n] for n in names)))
    result = []
    # None (e.g. no --data) sorts before any value.
    for key in sorted(groups, key=lambda k: (k[0], k[1], tuple((v is not None, v) for v in k[2]))):
        fam, agnostic, values = key
        label = ", ".join(f"{n}={v}" for n, v in zip(names, values, strict=True))
        result.append(Part(fam, agnostic, label, groups[key]))
    return result


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
