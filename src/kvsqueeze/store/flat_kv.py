"""FlatKV: the kept keys and values of one layer, every (sequence, kv-head) a ragged run.

All heads share one [slots, head_dim] key buffer and one value buffer. Head h owns
the slots [starts[h], starts[h] + capacity[h]); its live entries are the first
lengths[h] of them, in the order they were seen, with the original position of each
kept in `positions` (int32, or int16 where a QuantizedKV chose it; -1 marks a free
slot). Batch > 1 is batch folded into heads: nothing is padded to the longest head.
Besides K/V, a slot costs only its position: which head owns a slot is derived from
the per-head starts when (rarely) it is needed, never stored per slot.

Appending gives every head free slots of slack when one runs out. The slack is
layer-wide (the same for every head, a fraction of the mean head length) because a
decode step appends one token to every head alike: a per-head fraction would leave
short heads (Ada-KV's) with a few slots each and relayout the whole layer every few
steps. `reserve(n)` makes room for n appends at once, e.g. max_new_tokens after
the prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kvsqueeze.store.base import KVStore, check_truncation

MIN_SLACK = 16
# Slack per head on growth = mean head length / GROWTH_DIVISOR: at most ~6% of bytes
# held free, and a layer is copied about once per GROWTH_DIVISOR appended tokens per
# stored token (amortized O(1) copies per append).
GROWTH_DIVISOR = 16

# (keys, values, positions, slots [n]) -> the rows at `slots` of each, as new tensors:
# how eviction moves kept entries (torch here, a Triton kernel from ops/ on CUDA).
RowGather = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


def run_indices(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, head) of the concatenated ranges [starts[h], starts[h] + lengths[h])."""
    heads = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(len(heads), device=lengths.device) - first[heads]
    return starts[heads] + offsets, heads


def gather_rows(
    keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch RowGather: three index_selects."""
    return keys[slots], values[slots], positions[slots]


class FlatKV(KVStore):
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
        self._lengths, self.capacity = lengths, capacity
        self._relayout_metadata()

    def _relayout_metadata(self) -> None:
        self.starts = torch.cumsum(self.capacity, 0) - self.capacity
        # Host-side lower bound on free slots per head, so appends need no device sync.
        self._headroom = int((self.capacity - self._lengths).min()) if self.num_heads else 0

    # ---------------------------------------------------------------- building
    @classmethod
    def from_dense(
        cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor | None = None
    ) -> FlatKV:
        """Keep the entries keep[h, t] of dense keys/values [heads, tokens, head_dim].

        `positions` ([tokens] or [heads, tokens]) defaults to 0..tokens-1. The result
        is tight: no free slots until the first append (or reserve).
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
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative live lengths [heads + 1], as varlen attention kernels take them."""
        return torch.nn.functional.pad(torch.cumsum(self._lengths, 0), (1, 0))

    @property
    def nbytes(self) -> int:
        """True bytes held, from the tensors themselves (free slack slots included)."""
        tensors = (self.keys, self.values, self.positions, self._lengths, self.capacity, self.starts)
        return sum(x.numel() * x.element_size() for x in tensors)

    def slots(self, index: torch.Tensor) -> torch.Tensor:
        """Buffer slot of entry index[h, j] of head h's run, for index [heads, k]."""
        return self.starts[:, None] + index

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [heads, L, d], values [heads, L, d], positions [heads, L], live [heads, L]):
        every head's entries gathered and padded to the longest head L (a copy)."""
        longest = int(self._lengths.max()) if self.num_heads else 0
        index = torch.arange(longest, device=self.keys.device)[None, :].expand(self.num_heads, longest)
        live = index < self._lengths[:, None]
        slots = torch.where(live, self.slots(index), 0)
        return self.keys[slots], self.values[slots], self.positions[slots], live

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of head h's live entries, as views."""
        start, length = int(self.starts[h]), int(self._lengths[h])
        span = slice(start, start + length)
        return self.keys[span], self.values[span], self.positions[span]

    def runs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start, length in zip(self.starts.tolist(), self._lengths.tolist(), strict=True):
            span = slice(start, start + length)
            yield self.keys[span], self.values[span], self.positions[span]

    def max_position(self) -> int:
        return int(self.positions.max()) if len(self.positions) else -1  # free slots hold -1

    # ---------------------------------------------------------------- updates
    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        h, q, _ = keys.shape
        positions = positions.expand(h, q)
        added = self.make_room(q, valid)
        if valid is None:
            slots = self.slots(self._lengths[:, None] + torch.arange(q, device=keys.device)).flatten()
            keys, values, positions = keys.flatten(0, 1), values.flatten(0, 1), positions.flatten()
        else:
            slots = self.slots(self._lengths[:, None] + torch.cumsum(valid, dim=-1) - 1)[valid]
            keys, values, positions = keys[valid], values[valid], positions[valid]
        self.keys[slots] = keys.to(self.keys.dtype)
        self.values[slots] = values.to(self.values.dtype)
        self.positions[slots] = positions.to(self.positions.dtype)  # int32, or int16 in a QuantizedKV
        self._lengths += added

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep each head's first lengths[h] entries (KVStore.truncate); the slots of the
        dropped ones become free (position -1), so the layout and capacity stay."""
        lengths = check_truncation(self._lengths, lengths)
        dropped, _ = run_indices(self.starts + lengths, self._lengths - lengths)
        self.positions[dropped] = -1  # free slots hold -1: max_position() reads every slot
        self._lengths.copy_(lengths)  # in place, as appends advance it
        self._headroom = int((self.capacity - self._lengths).min()) if self.num_heads else 0

    def make_room(self, q: int, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Make sure every head has free slots for an append of q entries (valid[h, q]
        False ones excluded) and return the entries each head will get, [heads]. The
        caller then writes them after each head's live run: append(), or a GPU kernel."""
        added = (
            torch.full((self.num_heads,), q, device=self._lengths.device, dtype=self._lengths.dtype)
            if valid is None
            else valid.sum(dim=-1)
        )
        if self._headroom < q:
            needed = self._lengths + added
            if bool((needed > self.capacity).any()):
                slack = max(MIN_SLACK, int(needed.sum()) // (GROWTH_DIVISOR * self.num_heads))
                self._relayout(torch.maximum(self.capacity, needed + slack))
            else:
                self._headroom = int((self.capacity - self._lengths).min())
        self._headroom -= q
        return added

    def reserve(self, n: int) -> None:
        if self.num_heads and int((self.capacity - self._lengths).min()) < n:
            self._relayout(torch.maximum(self.capacity, self._lengths + n))

    def trim(self) -> None:
        if self.num_heads and bool((self.capacity > self._lengths).any()):
            self._relayout(self._lengths.clone())

    def _relayout(self, capacity: torch.Tensor) -> None:
        """Move every head's live run into a fresh buffer with the given capacities."""
        src, heads = run_indices(self.starts, self._lengths)
        new_starts = torch.cumsum(capacity, 0) - capacity
        dst = new_starts[heads] + (src - self.starts[heads])
        total = int(capacity.sum())
        keys = self.keys.new_zeros((total, self.head_dim))
        values = self.values.new_zeros((total, self.values.shape[-1]))  # may be wider than keys (quantized rows)
        positions = self.positions.new_full((total,), -1)
        keys[dst], values[dst], positions[dst] = self.keys[src], self.values[src], self.positions[src]
        self.keys, self.values, self.positions, self.capacity = keys, values, positions, capacity
        self._relayout_metadata()

    def evict(self, keep: torch.Tensor, gather: RowGather = gather_rows) -> None:
        """Keep entries keep[h, i] of each head's live run (see KVStore.evict), packed
        tightly in order into fresh buffers. `gather` moves the rows: ops/ passes a
        Triton kernel on CUDA (store/ never imports ops/)."""
        if self.num_heads and keep.shape[1] < int(self._lengths.max()):
            raise ValueError(f"keep has {keep.shape[1]} columns, fewer than the longest head's entries")
        index = torch.arange(keep.shape[1], device=keep.device)
        keep = keep & (index[None, :] < self._lengths[:, None])
        heads, entries = keep.nonzero(as_tuple=True)  # head-major, in run order: the new layout
        src = self.starts[heads] + entries
        self.keys, self.values, self.positions = gather(self.keys, self.values, self.positions, src)
        self._lengths = keep.sum(dim=-1)
        self.capacity = self._lengths.clone()
        self._relayout_metadata()
