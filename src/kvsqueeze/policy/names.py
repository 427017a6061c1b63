"""The policy-name grammar: `full`, `<scorer>`, `<composed>`, `ada-<either>` and
`cross-<scorer>`, parsed in one place into registry keys (scorer, allocator, schedule)."""

from __future__ import annotations

from typing import NamedTuple

from kvsqueeze.policy.score import SCORERS

ADA_PREFIX = "ada-"
# One ranking over all layers replaces any layer schedule: no `cross-<composed>`.
CROSS_PREFIX = "cross-"
# Papers that name a scorer together with a layer schedule.
COMPOSED: dict[str, tuple[str, str]] = {"pyramidkv": ("snapkv", "pyramid")}


class PolicyName(NamedTuple):
    """Registry keys of a policy name: SCORERS (None for `full`), ALLOCATORS, SCHEDULES."""

    scorer: str | None
    allocator: str
    schedule: str


def parse_policy_name(name: str) -> PolicyName:
    """`full` -> (None, uniform, flat); `snapkv` -> (snapkv, uniform, flat);
    `pyramidkv` -> (snapkv, uniform, pyramid); `ada-X` -> X with the ada allocator;
    `cross-S` -> (S, cross, flat) for a scorer S."""
    if name.startswith(CROSS_PREFIX) and name.removeprefix(CROSS_PREFIX) in SCORERS:
        return PolicyName(name.removeprefix(CROSS_PREFIX), "cross", "flat")
    base = name.removeprefix(ADA_PREFIX)
    allocator = "ada" if base != name else "uniform"
    if name == "full":
        return PolicyName(None, "uniform", "flat")
    if base in SCORERS:
        return PolicyName(base, allocator, "flat")
    if base in COMPOSED:
        scorer, schedule = COMPOSED[base]
        return PolicyName(scorer, allocator, schedule)
    raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(policy_names())}")


def policy_names() -> list[str]:
    """Every name parse_policy_name accepts."""
    ada = [f"{ADA_PREFIX}{base}" for base in (*COMPOSED, *SCORERS)]
    cross = [f"{CROSS_PREFIX}{scorer}" for scorer in SCORERS]
    return ["full", *SCORERS, *COMPOSED, *ada, *cross]
