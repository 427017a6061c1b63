"""FlatKV: the kept keys and values of one layer, every (sequence, kv-head) a ragged run.

All heads share one [slots, head_dim] key buffer and one value buffer. Head h owns
the slots [starts[h], starts[h] + capacity[h]); its live entries are the first
lengths[h] of them, in the order they were seen, with the original position of each
kept in `positions` (-1 marks a free slot). Batch > 1 is batch folded into heads:
nothing is padded to the longest head.

Appending gives every head a few free slots of slack when it runs out, so a decode
step writes in place and the whole cache is copied only once every `slack` steps.
"""

from __future__ import annotations

import torch

MIN_SLACK = 16


def run_indices(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, head) of the concatenated ranges [starts[h], starts[h] + lengths[h])."""
    heads = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(len(heads), device=lengths.device) - first[heads]
    return starts[heads] + offsets, heads


def slack_for(lengths: torch.Tensor) -> torch.Tensor:
    """Free slots a head gets when it grows: enough to amortize the copy, small
    enough (1/32 of its length) that stored bytes stay close to kept tokens."""
    return torch.clamp_min(lengths // 32, MIN_SLACK)


class FlatKV:
    """Ragged per-head key/value storage for one layer. It knows nothing of models."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        lengths: torch.Tensor,
        capacity: torch.Tensor,
    ) -> None:
        self.keys, self.values, self.positions = keys, values, positions
        self.lengths, self.capacity = lengths, capacity
        self._relayout_metadata()

    def _relayout_metadata(self) -> None:
        self.starts = torch.cumsum(self.capacity, 0) - self.capacity
        self.slot_head = torch.repeat_interleave(
            torch.arange(self.num_heads, device=self.capacity.device), self.capacity
        )
        # Host-side lower bound on free slots per head, so appends need no device sync.
        self._headroom = int((self.capacity - self.lengths).min()) if self.num_heads else 0

    # ---------------------------------------------------------------- building
    @classmethod
    def from_dense(
        cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor | None = None
    ) -> FlatKV:
        """Keep the entries keep[h, t] of dense keys/values [heads, tokens, head_dim].

        `positions` ([tokens] or [heads, tokens]) defaults to 0..tokens-1. The result
        is tight: no free slots until the first append.
        """
        h, t, _ = keys.shape
        if positions is None:
            positions = torch.arange(t, device=keys.device)
        positions = positions.expand(h, t)
        lengths = keep.sum(dim=-1)
        return cls(
            keys[keep].contiguous(),
            values[keep].contiguous(),
            positions[keep].to(torch.int32),
            lengths,
            lengths.clone(),
        )

    # ---------------------------------------------------------------- queries
    @property
    def num_heads(self) -> int:
        return self.lengths.shape[0]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def num_tokens(self) -> int:
        """Live (kept) entries over all heads."""
        return int(self.lengths.sum())

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative live lengths [heads + 1], as varlen attention kernels take them."""
        return torch.nn.functional.pad(torch.cumsum(self.lengths, 0), (1, 0))

    @property
    def nbytes(self) -> int:
        """True bytes held, from the tensors themselves (free slack slots included)."""
        tensors = (self.keys, self.values, self.positions, self.lengths, self.capacity, self.starts, self.slot_head)
        return sum(x.numel() * x.element_size() for x in tensors)

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of head h's live entries, as views."""
        start, length = int(self.starts[h]), int(self.lengths[h])
        span = slice(start, start + length)
        return self.keys[span], self.values[span], self.positions[span]

    # ---------------------------------------------------------------- updates
    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Append new entries [heads, q, head_dim] with their positions [heads, q]
        (or [q]); entries where valid[h, q] is False are skipped."""
        h, q, _ = keys.shape
        positions = positions.expand(h, q)
        if valid is None:
            added = torch.full((h,), q, device=keys.device, dtype=self.lengths.dtype)
            offsets = torch.arange(q, device=keys.device).expand(h, q)
        else:
            added = valid.sum(dim=-1)
            offsets = torch.cumsum(valid, dim=-1) - 1
        self.reserve(q, added)
        slots = self.starts[:, None] + self.lengths[:, None] + offsets
        if valid is None:
            slots, keys, values, positions = (
                slots.flatten(),
                keys.flatten(0, 1),
                values.flatten(0, 1),
                positions.flatten(),
            )
        else:
            slots, keys, values, positions = slots[valid], keys[valid], values[valid], positions[valid]
        self.keys[slots] = keys.to(self.keys.dtype)
        self.values[slots] = values.to(self.values.dtype)
        self.positions[slots] = positions.to(torch.int32)
        self.lengths += added

    def reserve(self, q: int, added: torch.Tensor) -> None:
        """Make room for `added[h]` (at most q) more entries in every head; the caller
        then writes them after each head's live run (append, or a GPU kernel)."""
        if self._headroom < q:
            self._ensure_capacity(added)
        self._headroom -= q

    def _ensure_capacity(self, added: torch.Tensor) -> None:
        needed = self.lengths + added
        if bool((needed > self.capacity).any()):
            self._relayout(needed + slack_for(needed))
        else:
            self._headroom = int((self.capacity - self.lengths).min())

    def _relayout(self, capacity: torch.Tensor) -> None:
        """Move every head's live run into a fresh buffer with the given capacities."""
        src, heads = run_indices(self.starts, self.lengths)
        new_starts = torch.cumsum(capacity, 0) - capacity
        dst = new_starts[heads] + (src - self.starts[heads])
        total = int(capacity.sum())
        keys = self.keys.new_zeros((total, self.head_dim))
        values = self.values.new_zeros((total, self.head_dim))
        positions = self.positions.new_full((total,), -1)
        keys[dst], values[dst], positions[dst] = self.keys[src], self.values[src], self.positions[src]
        self.keys, self.values, self.positions, self.capacity = keys, values, positions, capacity
        self._relayout_metadata()

    def compact(self, keep: torch.Tensor) -> None:
        """Evict: keep only the live entries with keep[slot] True, tightly packed."""
        live = self.positions >= 0
        keep = keep & live
        self.lengths = torch.zeros_like(self.lengths).index_add_(0, self.slot_head, keep.to(self.lengths.dtype))
        self.keys, self.values = self.keys[keep].contiguous(), self.values[keep].contiguous()
        self.positions = self.positions[keep]
        self.capacity = self.lengths.clone()
        self._relayout_metadata()
