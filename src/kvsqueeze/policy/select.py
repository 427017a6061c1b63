"""Selection: turn per-head keep counts into the kept token set."""

from __future__ import annotations

import torch


def ranks_within(scores: torch.Tensor) -> torch.Tensor:
    """rank[..., i] = position of element i when its last axis is sorted descending."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks


def keep_mask(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """keep[b, h, t] is True for the counts[b, h] highest-scoring tokens of head (b, h)."""
    return ranks_within(scores) < counts.unsqueeze(-1)
