"""The policy-name grammar: one parser, backed by the scorer/allocator/schedule
registries, and make_policy builds exactly what it parses."""

from __future__ import annotations

import pytest

import kvsqueeze.policy.allocate as allocate
from kvsqueeze.policy import PolicyName, make_policy, parse_policy_name, policy_names
from kvsqueeze.policy.allocate import ALLOCATORS
from kvsqueeze.policy.schedule import SCHEDULES, FlatSchedule
from kvsqueeze.policy.score import SCORERS


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("full", (None, "uniform", "flat")),
        ("snapkv", ("snapkv", "uniform", "flat")),
        ("ada-tova", ("tova", "ada", "flat")),
        ("pyramidkv", ("snapkv", "uniform", "pyramid")),
        ("ada-pyramidkv", ("snapkv", "ada", "pyramid")),
    ],
)
def test_parse_policy_name(name, parsed):
    assert parse_policy_name(name) == PolicyName(*parsed)
    scorer, allocator, schedule = parse_policy_name(name)  # a plain (scorer, allocator, schedule) triple
    assert (scorer, allocator, schedule) == parsed


@pytest.mark.parametrize("name", ["ada-full", "ada-", "snapkvv", "ada-ada-snapkv", "", "Full"])
def test_unknown_names_are_refused_by_the_parser(name):
    with pytest.raises(ValueError, match="unknown policy"):
        parse_policy_name(name)


@pytest.mark.parametrize("name", policy_names())
def test_make_policy_builds_what_the_grammar_says(name):
    parsed = parse_policy_name(name)
    policy = make_policy(name, keep=0.5, window=4)
    assert policy.name == name
    if parsed.scorer is None:
        assert policy.scorer is None
        return
    assert type(policy.scorer) is SCORERS[parsed.scorer]
    assert type(policy.allocator) is ALLOCATORS[parsed.allocator]
    assert type(policy.schedule) is SCHEDULES[parsed.schedule]
    if parsed.scorer == "snapkv":  # Ada-KV's GQA order (reduce, then pool) for ada-* names
        expected = "reduce-then-pool" if parsed.allocator == "ada" else "pool-then-reduce"
        assert policy.scorer.pool_order == expected


def test_every_registered_scorer_has_both_names_and_schedules_live_apart():
    names = set(policy_names())
    assert all(s in names and f"ada-{s}" in names for s in SCORERS)
    assert {"pyramidkv", "ada-pyramidkv"} <= names
    assert not hasattr(allocate, "FlatSchedule")
    assert FlatSchedule.__module__ == "kvsqueeze.policy.schedule.flat"
