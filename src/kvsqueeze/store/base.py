"""The store interface: what a compressed layer and ops/ may ask of any KV store.

A store holds the kept keys and values of one layer for a set of "heads" (batch
folded into kv-heads: row r is sequence r // kv_heads, kv-head r % kv_heads). Every
head is an ordered run of live entries, each with the position it had in its
sequence. FlatKV (one buffer per layer), PagedKV (fixed-size blocks from a shared
pool) and quantized stores implement this; the compressed layer and the attention
ops read stores only through it, so they are interchangeable.

The store owns its layout arithmetic; callers never compute slots themselves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StoreMark:
    """A store's state as KVStore.mark() saw it, for rollback(): each head's length
    [heads], and what else the store needs to tell whether it can return there
    exactly (a QuantizedKV's quantized entries per head; None for other stores)."""

    lengths: torch.Tensor
    quantized: torch.Tensor | None = None


def check_truncation(lengths: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`keep` as the per-head lengths a store holding `lengths` [heads] may be truncated
    to (same shape, between 0 and each head's length), or a ValueError saying why not."""
    keep = torch.as_tensor(keep, device=lengths.device)
    if keep.shape != lengths.shape or keep.dtype.is_floating_point or keep.dtype == torch.bool:
        raise ValueError(
            f"truncate takes integer lengths of shape {tuple(lengths.shape)}, got {keep.dtype} {tuple(keep.shape)}"
        )
    keep = keep.to(lengths.dtype)
    if bool((keep < 0).any()):
        raise ValueError(f"cannot truncate a head to a negative length: {keep.tolist()}")
    longer = (keep > lengths).nonzero().flatten().tolist()
    if longer:
        h = longer[0]
        raise ValueError(
            f"cannot truncate head {h} to {int(keep[h])} entries: it holds {int(lengths[h])} "
            f"(a rollback can only drop entries appended after its mark)"
        )
    return keep


class KVStore(ABC):
    """Ragged per-head K/V for one layer. It knows nothing of models."""

    @property
    @abstractmethod
    def lengths(self) -> torch.Tensor:
        """Live entries per head, [heads] (int64, on the store's device)."""

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype attention computes in (the dequantized dtype for quantized stores)."""

    @property
    def num_heads(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        """Live entries over all heads."""
        return int(self.lengths.sum())

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """True bytes held now, from the tensors themselves (slack and metadata included)."""

    def logical_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes a dense, uncompressed store would hold for the live entries (keys and
        values only), in `dtype` (default: the store's): what savings compare against."""
        element = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.num_tokens * self.head_dim * element

    @abstractmethod
    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Append keys/values [heads, q, head_dim] at positions ([heads, q] or [q]) after
        each head's live run; entries with valid[heads, q] False are skipped."""

    @abstractmethod
    def reserve(self, n: int) -> None:
        """Make room for n more entries in every head now (e.g. n = max_new_tokens after
        the prefill), so that the next n one-token appends need no reallocation."""

    @abstractmethod
    def trim(self) -> None:
        """Give back room held beyond the live entries (growth slack, a reservation
        that went unused), so nbytes is the live entries' own. A no-op when tight."""

    @abstractmethod
    def evict(self, keep: torch.Tensor) -> None:
        """Keep only entries keep[head, i] (i indexes each head's live run in order,
        [heads, >= max length]; columns past a head's length are ignored) and release
        the room the others held."""

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep only the first lengths[h] entries of each head's run (lengths [heads],
        at most each head's length): what drops the entries the last appends added.
        Stores that cannot do it say so."""
        raise NotImplementedError(f"{type(self).__name__} cannot be truncated")

    def mark(self) -> StoreMark:
        """The store as it is now, for rollback()."""
        return StoreMark(self.lengths.clone())

    def check_rollback(self, mark: StoreMark) -> None:
        """Raise the ValueError rollback(mark) would, changing nothing."""
        check_truncation(self.lengths, mark.lengths)

    def rollback(self, mark: StoreMark) -> None:
        """Drop every entry appended since mark() gave `mark`, so the store reads as it
        did then (free room it grew meanwhile is kept). Appends since are the only
        change it undoes: an eviction since the mark is not."""
        self.check_rollback(mark)
        self.truncate(mark.lengths)

    def rollback_room(self) -> int | None:
        """How many more entries per head appends may add from now on and still be
        undone exactly by rollback(mark()); None: any number."""
        return None

    @abstractmethod
    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [n, d], values [n, d], positions [n]) of head h's live entries, in
        order: views where the layout allows, gathered copies otherwise."""

    def runs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """head(h) for every head in order. Stores override it to read their
        bookkeeping once instead of once per head."""
        for h in range(self.num_heads):
            yield self.head(h)

    def max_position(self) -> int:
        """The largest position of any live entry, -1 when there is none (attention
        skips masking when every query is newer than this)."""
        return max((int(p.max()) for _, _, p in self.runs() if len(p)), default=-1)
