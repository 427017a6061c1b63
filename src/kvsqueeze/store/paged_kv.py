"""PagedKV: one layer's kept K/V in blocks of a BlockPool that all layers share.

Head h (a (sequence, kv-head) row, batch folded into heads as in FlatKV) owns the
blocks block_table[h, :num_blocks[h]]; its i-th live entry sits in slot i % block_size
of block block_table[h, i // block_size]. Sequences join (their prefill's kept
entries go into fresh blocks) and leave (their blocks go back to the pool) without
moving anyone else's entries; only the small block table is rebuilt. Eviction packs a
head's kept entries into its leading blocks, in order, and returns the blocks left
over, so memory follows what each head keeps, a block at a time.

Bookkeeping (block ids, blocks and lengths per head) lives on the host, where
allocation happens; the block table and the lengths are mirrored on the pool's
device for attention. An append whose `valid` mask is on the GPU costs one sync
(the pool must know how many entries each head gets).

A store can be forked: the fork's heads point at the same blocks (the pool counts
their holders), so a compressed prefix is stored once for every sequence that starts
with it. Writes go only to blocks a store holds alone: a shared block is copied
first (copy-on-write), and `unshare_tails` does that up front for the partly filled
last blocks that appends would write into.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from kvsqueeze.store.base import KVStore
from kvsqueeze.store.block_pool import BlockPool


class PagedKV(KVStore):
    """Ragged per-head K/V in fixed-size blocks from a shared pool, for one layer."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._table = torch.empty(0, 0, dtype=torch.int32)  # host; -1 where a head owns no block
        self._num_blocks = torch.empty(0, dtype=torch.int64)  # host, blocks owned per head
        self._host_lengths = torch.empty(0, dtype=torch.int64)
        self._lengths = self._host_lengths.to(pool.device, copy=True)
        self._device_table: torch.Tensor | None = None

    @classmethod
    def from_dense(
        cls,
        pool: BlockPool,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> PagedKV:
        """A PagedKV holding the entries keep[h, t] of dense keys/values [heads, t, d]
        (FlatKV.from_dense's contract; bind the pool with functools.partial to use it as
        a store factory)."""
        kv = cls(pool)
        kv.join(keys, values, keep, positions)
        return kv

    # ---------------------------------------------------------------- queries
    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @property
    def head_dim(self) -> int:
        return self.pool.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.dtype

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    @property
    def block_table(self) -> torch.Tensor:
        """Block ids per head, [heads, max blocks] int32 on the pool's device (-1 pads)."""
        if self._device_table is None:
            self._device_table = self._table.to(self.pool.device)
        return self._device_table

    @property
    def host_table(self) -> torch.Tensor:
        """The block table on the host, [heads, width] int32 (-1 past a head's blocks)."""
        return self._table

    @property
    def host_lengths(self) -> torch.Tensor:
        """Live entries per head on the host, [heads] int64."""
        return self._host_lengths

    @property
    def num_blocks(self) -> torch.Tensor:
        """Blocks each head owns, [heads] (host)."""
        return self._num_blocks

    def owned_blocks(self) -> list[int]:
        """Every block this layer owns (for checks that the pool is whole)."""
        owned = torch.arange(self._table.shape[1])[None, :] < self._num_blocks[:, None]
        return self._table[owned].tolist()

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks this layer owns, plus its block table and lengths."""
        blocks = int(self._num_blocks.sum()) * self.pool.block_nbytes
        return blocks + self._table.numel() * self._table.element_size() + self._lengths.numel() * 8

    def _slots_of(self, heads: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Pool slot (block * block_size + offset, in the pool viewed as [blocks *
        block_size, ...]) of entry index[i] of head heads[i], for entries inside the
        head's blocks (other indices give meaningless slots)."""
        table = self.block_table
        column = (index // self.block_size).clamp(0, max(table.shape[1] - 1, 0))
        return table[heads, column].long() * self.block_size + index % self.block_size

    def live_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots [heads, L], live [heads, L]) for L the longest head: the pool slot of
        every head's entries in order, padded to L (padding points at slot 0)."""
        longest = self._longest()
        live = torch.arange(longest, device=self.pool.device)[None, :] < self._lengths[:, None]
        blocks = self._padded_blocks(longest)
        within = torch.arange(self.block_size, device=self.pool.device)
        slots = (blocks[:, :, None] * self.block_size + within).flatten(1)[:, :longest]
        return torch.where(live, slots, 0), live

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [heads, L, d], values [heads, L, d], positions [heads, L], live [heads, L]):
        every head's entries gathered and padded to the longest head L (a copy; the
        padding holds whatever its block holds: mask it with `live`)."""
        longest = self._longest()
        live = torch.arange(longest, device=self.pool.device)[None, :] < self._lengths[:, None]
        # Whole blocks are gathered (one index per block_size entries), then cut to L.
        blocks = self._padded_blocks(longest).flatten()
        h, d = self.num_heads, self.head_dim
        keys = self.pool.keys.index_select(0, blocks).view(h, -1, d)[:, :longest]
        values = self.pool.values.index_select(0, blocks).view(h, -1, d)[:, :longest]
        positions = self.pool.positions.index_select(0, blocks).view(h, -1)[:, :longest]
        return keys, values, positions, live

    def _longest(self) -> int:
        return int(self._host_lengths.max()) if self.num_heads else 0

    def _padded_blocks(self, longest: int) -> torch.Tensor:
        """Block ids [heads, ceil(longest / block_size)] (int64); block 0 where a head has none."""
        width = -(-longest // self.block_size)
        return self.block_table[:, :width].clamp_min(0).long()

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values, positions) of head h's live entries, gathered from its blocks."""
        n = int(self._host_lengths[h])
        index = torch.arange(n, device=self.pool.device)
        slots = self._slots_of(torch.full_like(index, h), index)
        d = self.head_dim
        return (
            self.pool.keys.view(-1, d)[slots],
            self.pool.values.view(-1, d)[slots],
            self.pool.positions.view(-1)[slots],
        )

    def runs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        keys, values, positions, _ = self.padded()
        for h, n in enumerate(self._host_lengths.tolist()):
            yield keys[h, :n], values[h, :n], positions[h, :n]

    def max_position(self) -> int:
        slots, live = self.live_slots()
        positions = self.pool.positions.view(-1)[slots][live]
        return int(positions.max()) if len(positions) else -1

    # ---------------------------------------------------------------- membership
    def fork(self) -> PagedKV:
        """A store with the same heads and entries, sharing every block (no copy)."""
        kv = PagedKV(self.pool)
        kv._table, kv._num_blocks = self._table.clone(), self._num_blocks.clone()
        kv._host_lengths, kv._lengths = self._host_lengths.clone(), self._lengths.clone()
        self.pool.share(self.owned_blocks())
        return kv

    def shared_tails(self) -> int:
        """Partly filled last blocks that are shared: the copies `unshare_tails` takes."""
        return len(self._tails())

    def unshare_tails(self) -> None:
        """Copy every shared, partly filled last block, so appends never write into a
        block another holder reads."""
        heads = self._tails()
        if heads:
            heads = torch.tensor(heads)
            self._own(heads, (self._host_lengths[heads] // self.block_size))

    def _tails(self) -> list[int]:
        size, table = self.block_size, self._table
        return [
            h
            for h, n in enumerate(self._host_lengths.tolist())
            if n % size and self.pool.is_shared(int(table[h, n // size]))
        ]

    def _own(self, heads: torch.Tensor, columns: torch.Tensor) -> None:
        """Give head heads[i] a private copy of its block at columns[i] where it is shared."""
        pairs = {(int(h), int(c)) for h, c in zip(heads.tolist(), columns.tolist(), strict=True)}
        shared = [(h, c) for h, c in sorted(pairs) if self.pool.is_shared(int(self._table[h, c]))]
        if not shared:
            return
        old = [int(self._table[h, c]) for h, c in shared]
        new = self.pool.allocate(len(shared))
        src, dst = torch.tensor(old, device=self.pool.device), torch.tensor(new, device=self.pool.device)
        for buffer in (self.pool.keys, self.pool.values, self.pool.positions):
            buffer[dst] = buffer[src]
        rows, cols = zip(*shared, strict=True)
        self._table[list(rows), list(cols)] = torch.tensor(new, dtype=torch.int32)
        self.pool.release(old)
        self._device_table = None

    def join(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> slice:
        """Add heads for a new sequence: the entries keep[h, t] (default all) of dense
        keys/values [n, t, d] at positions ([t] or [n, t], default 0..t-1). Returns the
        rows they got (the last n); no other head's entries move."""
        n, t, _ = keys.shape
        if positions is None:
            positions = torch.arange(t, device=keys.device)
        first = self.num_heads
        lengths = keep.sum(dim=-1) if keep is not None else torch.full((n,), t, dtype=torch.int64)
        self._table = torch.cat([self._table, self._table.new_full((n, self._table.shape[1]), -1)])
        self._num_blocks = torch.cat([self._num_blocks, self._num_blocks.new_zeros(n)])
        self._host_lengths = torch.cat([self._host_lengths, self._host_lengths.new_zeros(n)])
        self._lengths = torch.cat([self._lengths, self._lengths.new_zeros(n)])
        self._device_table = None
        new_lengths = lengths.cpu()
        self._grow(torch.cat([self._host_lengths[:first], new_lengths]))
        if keep is None:
            self._write_whole(first, keys, values, positions.expand(n, t))
        else:
            heads, tokens = keep.nonzero(as_tuple=True)
            index = (torch.cumsum(keep, dim=-1) - 1)[heads, tokens]
            self._write(first + heads, index, keys[keep], values[keep], positions.expand(n, t)[keep])
        self._host_lengths[first:] = new_lengths
        self._lengths = self._host_lengths.to(self.pool.device, copy=True)
        return slice(first, first + n)

    def leave(self, rows: slice | Sequence[int] | torch.Tensor) -> None:
        """Remove heads (e.g. a finished sequence's): their blocks go back to the pool
        and later rows move up; no entry of another head moves."""
        gone = torch.zeros(self.num_heads, dtype=torch.bool)
        gone[rows] = True
        owned = torch.arange(self._table.shape[1])[None, :] < self._num_blocks[:, None]
        self.pool.release(self._table[owned & gone[:, None]].tolist())
        stay = ~gone
        self._table, self._num_blocks = self._table[stay], self._num_blocks[stay]
        self._host_lengths = self._host_lengths[stay]
        self._lengths = self._lengths[stay.to(self._lengths.device)]
        self._device_table = None
        self._trim_table()

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
        heads = torch.arange(h, device=keys.device)[:, None].expand(h, q)
        if valid is None:
            added = torch.full((h,), q, dtype=torch.int64)
            index = self._lengths[:, None] + torch.arange(q, device=keys.device)
        else:
            added = valid.sum(dim=-1).cpu()
            index = (self._lengths[:, None] + torch.cumsum(valid, dim=-1) - 1)[valid]
            heads, keys, values, positions = heads[valid], keys[valid], values[valid], positions[valid]
        self._grow(self._host_lengths + added)
        self._write(heads.flatten(), index.flatten(), keys.flatten(0, -2), values.flatten(0, -2), positions.flatten())
        self._host_lengths = self._host_lengths + added
        self._lengths = self._lengths + added.to(self._lengths.device)

    def reserve(self, n: int) -> None:
        self._grow(self._host_lengths + n)

    def trim(self) -> None:
        self._shrink()

    def evict(self, keep: torch.Tensor) -> None:
        if self.num_heads and keep.shape[1] < int(self._host_lengths.max()):
            raise ValueError(f"keep has {keep.shape[1]} columns, fewer than the longest head's entries")
        index = torch.arange(keep.shape[1], device=keep.device)
        keep = keep & (index[None, :] < self._lengths[:, None])
        heads, entries = keep.nonzero(as_tuple=True)
        packed = (torch.cumsum(keep, dim=-1) - 1)[heads, entries]  # a kept entry's new index: never later
        moved = packed != entries
        self._own(heads[moved].cpu(), (packed[moved] // self.block_size).cpu())
        src, dst = self._slots_of(heads, entries), self._slots_of(heads, packed)
        d = self.head_dim
        for buffer in (self.pool.keys.view(-1, d), self.pool.values.view(-1, d), self.pool.positions.view(-1)):
            buffer[dst] = buffer[src]  # the gather copies first: moves within a head cannot clobber
        self._lengths = keep.sum(dim=-1)
        self._host_lengths = self._lengths.cpu()
        self._shrink()

    # ---------------------------------------------------------------- blocks
    def _write(
        self,
        heads: torch.Tensor,
        index: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Write entries to entry index[i] of head heads[i] (blocks already owned)."""
        slots = self._slots_of(heads, index)
        d = self.head_dim
        self.pool.keys.view(-1, d)[slots] = keys.to(self.dtype)
        self.pool.values.view(-1, d)[slots] = values.to(self.dtype)
        self.pool.positions.view(-1)[slots] = positions.to(torch.int32)

    def _write_whole(self, first: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Write every entry of dense keys/values [n, t, d] (positions [n, t]) to heads
        first.. (blocks already owned): whole blocks as one indexed copy per block, the
        last partial block entry by entry. A prefill chunk joins this way."""
        n, t, d = keys.shape
        size = self.block_size
        whole = t // size * size
        if whole:
            blocks = self._table[first : first + n, : whole // size].reshape(-1).long().to(self.pool.device)
            self.pool.keys[blocks] = keys[:, :whole].reshape(-1, size, d).to(self.dtype)
            self.pool.values[blocks] = values[:, :whole].reshape(-1, size, d).to(self.dtype)
            self.pool.positions[blocks] = positions[:, :whole].reshape(-1, size).to(torch.int32)
        if whole < t:
            heads = torch.arange(first, first + n, device=keys.device).repeat_interleave(t - whole)
            index = torch.arange(whole, t, device=keys.device).repeat(n)
            rest = slice(whole, t)
            self._write(
                heads,
                index,
                keys[:, rest].reshape(-1, d),
                values[:, rest].reshape(-1, d),
                positions[:, rest].reshape(-1),
            )

    def _grow(self, targets: torch.Tensor) -> None:
        """Take blocks so that head h can hold targets[h] (host) entries."""
        need = (-(-targets // self.block_size) - self._num_blocks).clamp_min(0)
        total = int(need.sum())
        if total == 0:
            return
        blocks = torch.tensor(self.pool.allocate(total), dtype=torch.int32)
        owner = torch.repeat_interleave(torch.arange(self.num_heads), need)
        column = self._num_blocks[owner] + torch.arange(total) - (torch.cumsum(need, 0) - need)[owner]
        self._widen_to(int((self._num_blocks + need).max()))
        self._table[owner, column] = blocks
        self._num_blocks = self._num_blocks + need
        self._device_table = None

    def _widen_to(self, width: int) -> None:
        """Make the block table at least `width` columns wide, growing by half its width
        at least, so that appends widen it rarely."""
        if width > self._table.shape[1]:
            extra = max(width - self._table.shape[1], self._table.shape[1] // 2)
            self._table = torch.cat([self._table, self._table.new_full((self.num_heads, extra), -1)], dim=1)

    def _shrink(self) -> None:
        """Return the blocks past each head's live entries to the pool."""
        keep_blocks = -(-self._host_lengths // self.block_size)
        column = torch.arange(self._table.shape[1])[None, :]
        spare = (column >= keep_blocks[:, None]) & (column < self._num_blocks[:, None])
        self.pool.release(self._table[spare].tolist())
        self._table[spare] = -1
        self._num_blocks = keep_blocks
        self._device_table = None
        self._trim_table()

    def _trim_table(self) -> None:
        width = int(self._num_blocks.max()) if self.num_heads else 0
        if width < self._table.shape[1] // 2:  # keep some width: appends would widen it again
            self._table = self._table[:, :width].contiguous()
            self._device_table = None


def append_step(
    stores: Sequence[PagedKV],
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: list[int],
    kernel: Callable[..., torch.Tensor] | None = None,
) -> None:
    """One decode step of many sequences: one new entry for every head of every store
    (all over the same pool), in one write into the pool. keys/values [stores x heads, d];
    positions[i] is store i's new position. Blocks are taken only by heads whose last
    block is full. This runs for every layer of every decode step: `kernel` may do the
    writing in one call (the engine passes the CPU kernel's, ops/cpu_paged_decode.py):
    kernel(stores, keys, values, positions, spare) writes every entry, handing the block
    ids `spare` to the heads whose last block is full, and returns nothing; or, where
    the ids are too few or such a head's table has no free column, writes nothing and
    returns those heads (rows across the stores)."""
    pool = stores[0].pool
    heads = stores[0].num_heads
    if kernel is not None:
        keys, values = keys.to(pool.dtype).contiguous(), values.to(pool.dtype).contiguous()
        full = kernel(stores, keys, values, positions)
        if full.numel():
            spare = pool.allocate(full.numel())
            if kernel(stores, keys, values, positions, spare).numel():  # a table to widen: the general way
                pool.release(spare)
                _take_one_block_each(stores, heads, full.tolist())
                kernel(stores, keys, values, positions)
        return
    lengths = torch.cat([kv._host_lengths for kv in stores])
    full = lengths >= torch.cat([kv._num_blocks for kv in stores]) * pool.block_size  # the head's last block is full
    if bool(full.any()):
        _take_one_block_each(stores, heads, full.nonzero().flatten().tolist())
    index = step_next_slots(stores).to(pool.device)
    for kv in stores:
        kv._host_lengths = kv._host_lengths + 1
        kv._lengths = kv._lengths + 1
    d = pool.head_dim
    pool.keys.view(-1, d)[index] = keys.to(pool.dtype)
    pool.values.view(-1, d)[index] = values.to(pool.dtype)
    pool.positions.view(-1)[index] = torch.tensor(positions, dtype=torch.int32).repeat_interleave(heads).to(pool.device)


def step_next_slots(stores: Sequence[PagedKV]) -> torch.Tensor:
    """[stores x heads] (host, int64): the pool slot of every head's next entry (its
    block must be owned), from one gather over all the stores' tables laid end to end."""
    size = stores[0].pool.block_size
    row_start, offset = [], 0  # where each head's row of block ids starts
    for kv in stores:
        width = kv._table.shape[1]
        row_start.extend(range(offset, offset + kv.num_heads * width, width))
        offset += kv.num_heads * width
    lengths = torch.cat([kv._host_lengths for kv in stores])
    tables = torch.cat([kv._table.reshape(-1) for kv in stores])
    blocks = tables[torch.tensor(row_start) + lengths // size].long()
    return blocks * size + lengths % size


def _take_one_block_each(stores: Sequence[PagedKV], heads: int, rows: list[int]) -> None:
    """Give head rows[i] (numbered across the stores, `heads` per store) one more block,
    taken from the pool at once. In a decode step a few heads cross a block boundary;
    the general _grow costs a tenth of a millisecond per store, this a few host integer
    operations per head."""
    blocks = iter(stores[0].pool.allocate(len(rows)))
    for s, group in itertools.groupby(rows, key=lambda row: row // heads):
        kv = stores[s]
        counts = kv._num_blocks.clone()  # a new tensor: whoever read num_blocks keeps what it read
        for row in group:
            h = row % heads
            column = int(counts[h])
            kv._widen_to(column + 1)
            kv._table[h, column] = next(blocks)
            counts[h] = column + 1
        kv._num_blocks = counts
        kv._device_table = None


def step_slots(stores: Sequence[PagedKV]) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots [stores x heads, L], live [stores x heads, L]): live_slots() of many stores
    over one pool, stacked and padded to the longest head of all, from one table."""
    pool = stores[0].pool
    width = max(kv._table.shape[1] for kv in stores)
    table = torch.cat([F.pad(kv._table, (0, width - kv._table.shape[1]), value=0) for kv in stores])
    lengths = torch.cat([kv._host_lengths for kv in stores])
    longest = int(lengths.max())
    within = torch.arange(pool.block_size)
    slots = (table.long()[:, :, None] * pool.block_size + within).flatten(1)[:, :longest]
    live = torch.arange(longest)[None, :] < lengths[:, None]
    return torch.where(live, slots, 0).to(pool.device), live.to(pool.device)
