"""Preset names -> policies, through the one name grammar (names.py) and the registries."""

from __future__ import annotations

import dataclasses

from kvsqueeze.policy.allocate import ALLOCATORS
from kvsqueeze.policy.budget import Budget
from kvsqueeze.policy.names import parse_policy_name
from kvsqueeze.policy.policy import Policy
from kvsqueeze.policy.schedule import SCHEDULES
from kvsqueeze.policy.score import SCORERS
from kvsqueeze.policy.score.base import GROUP_REDUCTIONS
from kvsqueeze.policy.score.snapkv import POOLS

# Scorers whose method keeps the first tokens (attention sinks) whatever they score:
# StreamingLLM, and Expected Attention (kvpress keeps 4 sinks out of its statistics and scores).
SINKS = {"streamingllm": 4, "expected-attention": 4}
# Scorers whose own scores do not come from the observation window: Ada-KV and
# cross-layer allocation size their heads' shares by Ada-KV's window scores instead
# (Policy.share_scorer). On the needle sweep, shares by their own scores lost to the
# uniform split at every budget (docs/results/quality_sweep).
WINDOW_SHARES = {"h2o", "tova-head"}


def make_policy(
    name: str,
    keep: float | None = None,
    tokens: int | None = None,
    window: int = 32,
    alpha: float = 0.2,
    group_reduce: str = "mean",
    seed: int = 0,
    safeguard: str = "paper",
    pool_order: str | None = None,
    pooling: str | None = None,
    kernel: int | None = None,
    ada_pool_kernel: int = 7,
) -> Policy:
    """Build a preset policy. With neither `keep` nor `tokens`, keep=0.25; `full` keeps all.

    `safeguard` picks Ada-KV's starvation rule ("paper" or "kvpress"); `pool_order` the
    SnapKV GQA order, by default "reduce-then-pool" (Ada-KV's) for ada-* names and
    "pool-then-reduce" otherwise. `pooling` ("avg", "max" or "none") and `kernel` (odd)
    set how scorers that pool along the sequence (SnapKV and its family) pool; None
    keeps each scorer's own default (SnapKV: avg, kernel 5). Scorers that do not pool
    ignore them, as they ignore `group_reduce`, so one sweep can pass them to all.
    `ada_pool_kernel`: Ada-KV counts head shares on scores max-pooled with this kernel
    (1: the paper's and kvpress's plain rule, for parity runs)."""
    parsed = parse_policy_name(name)
    # Validate the budget even for `full`, which then ignores it (it is the reference row of a sweep).
    budget = Budget(keep=keep if keep is not None or tokens is not None else 0.25, tokens=tokens)
    if parsed.scorer is None:
        return Policy(name=name, scorer=None, budget=Budget(keep=1.0), window=window)
    if group_reduce not in GROUP_REDUCTIONS:
        raise ValueError(f"unknown GQA group reduction {group_reduce!r}: use 'mean' or 'max'")
    if pooling is not None and pooling not in POOLS:
        raise ValueError(f"unknown pooling {pooling!r}: use one of {', '.join(POOLS)}")
    if kernel is not None and (kernel < 1 or kernel % 2 == 0):
        raise ValueError(f"pooling kernel must be odd and >= 1 (it keeps the length), got {kernel}")
    if ada_pool_kernel < 1 or ada_pool_kernel % 2 == 0:
        raise ValueError(f"Ada-KV pooling kernel must be odd and >= 1, got {ada_pool_kernel}")

    ada = parsed.allocator == "ada"
    scorer_cls = SCORERS[parsed.scorer]
    offered = {
        "seed": seed,
        "group_reduce": group_reduce,
        "pool_order": pool_order or ("reduce-then-pool" if ada else "pool-then-reduce"),
        "pool": pooling,
        "kernel": kernel,
    }
    fields = {f.name for f in dataclasses.fields(scorer_cls)}
    scorer = scorer_cls(**{k: v for k, v in offered.items() if k in fields and v is not None})
    allocator, share_scorer = ALLOCATORS["uniform"](), None
    if parsed.allocator != "uniform" and parsed.scorer in WINDOW_SHARES:
        share_scorer = SCORERS["snapkv"](pool="max", kernel=7, group_reduce=group_reduce, pool_order="reduce-then-pool")
    if ada:
        allocator = ALLOCATORS["ada"](alpha=alpha, safeguard=safeguard, pool_kernel=ada_pool_kernel)
    elif parsed.allocator == "cross":  # Ada-KV's safeguard and share pooling, over all layers
        allocator = ALLOCATORS["cross"](alpha=alpha, pool_kernel=ada_pool_kernel)
    return Policy(
        name=name,
        scorer=scorer,
        budget=budget,
        allocator=allocator,
        schedule=SCHEDULES[parsed.schedule](),
        window=window,
        sinks=SINKS.get(parsed.scorer, 0),
        share_scorer=share_scorer,
    )
