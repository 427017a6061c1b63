"""Protected tokens: the newest prompt tokens (the window) and the first ones (the
attention sinks) are kept whatever the scores say, inside the budget."""

from __future__ import annotations

import torch


def protected_tokens(
    valid: torch.Tensor, visible: torch.Tensor, budget: torch.Tensor, window: int, sinks: int
) -> torch.Tensor:
    """protected[b, t] of a left-padded batch: valid[b, t] marks real tokens, visible[b, t]
    those a sliding window still shows; budget[b] is the per-head budget.

    Protected tokens come in order, the newest first, then the sinks, and the sets
    shrink to fit the budget: the window counts inside the budget but takes at most
    half of it (at least the last token, unless window is 0), so that the scorer
    always chooses the other half; the sinks get what the window leaves. Sinks that
    a sliding window hides are not kept: no query can see them again.
    """
    b, t = valid.shape
    slot = torch.arange(t, device=valid.device)
    newest = torch.minimum(budget.clamp_min(2) // 2, torch.full_like(budget, window))
    first = torch.minimum(budget - newest, torch.full_like(budget, sinks))
    first_real = t - valid.sum(dim=-1)
    in_window = slot >= (t - newest).view(b, 1)
    in_sinks = slot < (first_real + first).view(b, 1)
    return (in_window | in_sinks) & visible
