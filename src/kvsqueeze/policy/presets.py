"""Preset names -> policies: `full`, each scorer by name, `pyramidkv`, and `ada-*`."""

from __future__ import annotations

from kvsqueeze.policy.allocate import AdaKVAllocator, PyramidSchedule
from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.policy import Policy
from kvsqueeze.policy.score import SCORERS, SnapKVScorer

STREAMING_SINKS = 4


def policy_names() -> list[str]:
    names = ["full", *SCORERS, "pyramidkv", "ada-pyramidkv"]
    names += [f"ada-{s}" for s in SCORERS]
    return names


def make_policy(
    name: str,
    keep: float | None = None,
    tokens: int | None = None,
    window: int = 32,
    alpha: float = 0.2,
    group_reduce: str = "mean",
    seed: int = 0,
) -> Policy:
    """Build a preset policy. With neither `keep` nor `tokens`, keep=0.25; `full` keeps all."""
    if name not in policy_names():
        raise ValueError(f"unknown policy {name!r}; choose from: {', '.join(policy_names())}")
    # Validate the budget even for `full`, which then ignores it (it is the reference row of a sweep).
    budget = Budget(keep=keep if keep is not None or tokens is not None else 0.25, tokens=tokens)
    if name == "full":
        return Policy(name="full", scorer=None, budget=Budget(keep=1.0), window=window)
    if group_reduce not in ("mean", "max"):
        raise ValueError(f"unknown GQA group reduction {group_reduce!r}: use 'mean' or 'max'")

    base = name.removeprefix("ada-")
    if base == "pyramidkv":
        scorer, schedule = SnapKVScorer(group_reduce=group_reduce), PyramidSchedule()
    else:
        scorer_cls = SCORERS[base]
        kwargs = {"seed": seed} if base == "random" else {}
        if base in ("snapkv", "h2o", "tova"):
            kwargs["group_reduce"] = group_reduce
        scorer, schedule = scorer_cls(**kwargs), None
    extra = {"schedule": schedule} if schedule is not None else {}
    if name.startswith("ada-"):
        extra["allocator"] = AdaKVAllocator(alpha=alpha)
    sinks = STREAMING_SINKS if base == "streamingllm" else 0
    return Policy(name=name, scorer=scorer, budget=budget, window=window, sinks=sinks, **extra)
