"""PagedQuantizedKV: one (layer, sequence)'s kept K/V in the engine's paged arena,
quantized KIVI-style (arXiv 2402.02750) once its policy has scored the prompt.

Every kv-head's run of entries is its quantized entries, then its full-precision ones:

- Before the prompt is compressed, everything is full precision (full-precision pages
  of store/quantized_block_pool.py), so the policy scores the unquantized prefill.
- `quantize(keep)` keeps the entries the policy chose and quantizes them, one key
  group per page, by QuantizedKV's rules (store/quantized_kv.py): groups counted from
  the head's newest entry back, the oldest n % G a shorter first group with its own
  scales; values per token. The full-precision pages go back to the pool before the
  quantized ones are taken, and a key group never takes more pages than the
  full-precision entries it replaces (G >= block_size), so this never needs headroom.
- Afterwards appends (decode steps, a recomputed sequence's generated tokens) go to
  the full-precision residual; once a head holds R + G there, its oldest G become a
  quantized page (so the newest R to R + G - 1 stay exact, as in QuantizedKV). The
  residual starts at an offset into its first page, so dropping the oldest G entries
  moves nothing: whole pages before the offset go back to the pool.
- `evict(keep)` (eviction while decoding) packs each quantized page's kept entries to
  its front (the group keeps its scales; a page left empty goes back) and rewrites the
  residual's kept entries into as few pages as they need.

A page records how many of its G slots are live, so a head's i-th quantized entry is
found from the running sum of its pages' counts. Bookkeeping lives on the host.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from kvsqueeze.store.base import KVStore
from kvsqueeze.store.quantized_block_pool import QuantizedBlockPool


class PagedQuantizedKV(KVStore):
    """Ragged per-head K/V of one layer and sequence in a QuantizedBlockPool."""

    def __init__(self, pool: QuantizedBlockPool, residual_len: int = 128) -> None:
        if residual_len < 0:
            raise ValueError(f"the residual window must be >= 0 tokens, got {residual_len}")
        self.pool, self.residual_len = pool, residual_len
        self.quantized = False  # whether the prompt has been quantized (appends then fill the residual)
        self._set_heads(0)

    def _set_heads(self, h: int) -> None:
        self._fp_table = torch.full((h, 0), -1, dtype=torch.int64)  # full-precision pages per head
        self._fp_pages = torch.zeros(h, dtype=torch.int64)
        self._fp_off = torch.zeros(h, dtype=torch.int64)  # first live slot of the first page
        self._fp_len = torch.zeros(h, dtype=torch.int64)
        self._q_table = torch.full((h, 0), -1, dtype=torch.int64)  # quantized pages (key groups) per head
        self._q_count = torch.zeros(h, 0, dtype=torch.int64)  # live entries of each page
        self._sync()

    def _sync(self) -> None:
        self._host_lengths = self._q_count.sum(dim=1) + self._fp_len
        self._lengths = self._host_lengths.to(self.pool.device)

    # ---------------------------------------------------------------- queries
    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @property
    def host_lengths(self) -> torch.Tensor:
        return self._host_lengths

    @property
    def head_dim(self) -> int:
        return self.pool.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.dtype

    @property
    def block_size(self) -> int:
        """Full-precision entries per page."""
        return self.pool.block_size

    @property
    def fp_table(self) -> torch.Tensor:
        return self._fp_table

    @property
    def fp_offsets(self) -> torch.Tensor:
        return self._fp_off

    @property
    def fp_lengths(self) -> torch.Tensor:
        return self._fp_len

    @property
    def q_table(self) -> torch.Tensor:
        return self._q_table

    @property
    def q_counts(self) -> torch.Tensor:
        return self._q_count

    def owned_blocks(self) -> list[int]:
        return [*self._fp_table[self._fp_table >= 0].tolist(), *self._q_table[self._q_table >= 0].tolist()]

    @property
    def nbytes(self) -> int:
        """Pages this store holds (quantized and full precision) plus its bookkeeping."""
        pages = int((self._fp_table >= 0).sum() + (self._q_table >= 0).sum())
        tables = (self._fp_table.numel() + self._q_table.numel() + self._q_count.numel() + 3 * self.num_heads) * 8
        return pages * self.pool.page_nbytes + tables

    def blocks_to_append(self, n: int) -> int:
        """Pages the heads take to append n entries each (flushes into quantized pages
        give back at least as many full-precision pages as they take: G >= block_size)."""
        size = self.block_size
        need = -(-(self._fp_off + self._fp_len + n) // size) - self._fp_pages
        return int(need.clamp_min(0).sum())

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys [heads, L, d], values, positions [heads, L], live [heads, L]): every
        entry, the quantized ones dequantized, in the store's dtype (a copy of this one
        store, for scoring an eviction)."""
        qk, qv, qp, qlive = self._quantized_entries(self.dtype)
        fk, fv, fp, flive = self._fp_entries()
        keys, values = torch.cat([qk, fk], dim=1), torch.cat([qv, fv], dim=1)
        positions, live = torch.cat([qp, fp], dim=1), torch.cat([qlive, flive], dim=1)
        return _left_pack(keys, values, positions, live)

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, values, positions, live = self.padded()
        n = int(self._host_lengths[h])
        return keys[h, :n], values[h, :n], positions[h, :n]

    def runs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        keys, values, positions, _ = self.padded()
        for h, n in enumerate(self._host_lengths.tolist()):
            yield keys[h, :n], values[h, :n], positions[h, :n]

    def _quantized_entries(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantized entries dequantized, [heads, pages x G, ...] with live marking the
        live slots (not packed)."""
        h, width, g, d = self.num_heads, self._q_table.shape[1], self.pool.group, self.head_dim
        if width == 0:
            empty = torch.zeros(h, 0, d, dtype=dtype, device=self.pool.device)
            return empty, empty.clone(), torch.zeros(h, 0, dtype=torch.int32), torch.zeros(h, 0, dtype=torch.bool)
        codes, rows, positions, scale, zero = self.pool.read_quantized(self._q_table)
        q = self.pool.quantizer
        # Dequantized in fp32, then cast: the arithmetic of QuantizedKV and of attention.
        keys = q.dequantize_keys(codes, scale[:, :, None], zero[:, :, None]).to(dtype)
        values = q.dequantize_rows(rows, d).to(dtype)
        live = torch.arange(g)[None, None, :] < self._q_count[:, :, None]
        return keys.flatten(1, 2), values.flatten(1, 2), positions.flatten(1, 2), live.flatten(1, 2)

    def _fp_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-precision entries, [heads, pages x block_size, ...], live marking them."""
        keys, values, positions = self.pool.read_full(self._fp_table)
        slot = torch.arange(self._fp_table.shape[1] * self.block_size)[None, :]
        live = (slot >= self._fp_off[:, None]) & (slot < (self._fp_off + self._fp_len)[:, None])
        return keys.flatten(1, 2), values.flatten(1, 2), positions.flatten(1, 2), live

    # ---------------------------------------------------------------- membership
    def join(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """The sequence's first chunk: keys/values [heads, t, d] at positions [t], in full precision."""
        if self.num_heads:
            raise RuntimeError("the store already holds heads")
        h, t, _ = keys.shape
        self._set_heads(h)
        if positions is None:
            positions = torch.arange(t)
        self.append(keys, values, positions)

    def leave(self, rows: slice | Sequence[int] | torch.Tensor | None = None) -> None:
        """Give every page back (a finished or preempted sequence leaves whole)."""
        self.pool.release(self.owned_blocks())
        self._set_heads(0)

    # ---------------------------------------------------------------- updates
    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Append keys/values [heads, q, d] at positions ([q] or [heads, q]) to the
        full-precision part, then quantize every group that fills the residual."""
        if valid is not None:
            raise NotImplementedError("the engine appends whole chunks: no valid mask")
        h, n, d = keys.shape
        self._grow(n)
        heads = torch.arange(h).repeat_interleave(n)
        index = (self._fp_off + self._fp_len)[:, None] + torch.arange(n)
        positions = positions.expand(h, n).flatten()
        self._write(heads, index.flatten(), keys.reshape(-1, d), values.reshape(-1, d), positions)
        self._fp_len = self._fp_len + n
        self._flush()
        self._sync()

    def _grow(self, n: int) -> None:
        """Take pages so every head's residual can hold n more entries."""
        size = self.block_size
        need = (-(-(self._fp_off + self._fp_len + n) // size) - self._fp_pages).clamp_min(0)
        total = int(need.sum())
        if not total:
            return
        pages = torch.tensor(self.pool.allocate(total), dtype=torch.int64)
        width = int((self._fp_pages + need).max())
        if width > self._fp_table.shape[1]:
            extra = max(width - self._fp_table.shape[1], self._fp_table.shape[1] // 2)
            self._fp_table = torch.cat([self._fp_table, self._fp_table.new_full((self.num_heads, extra), -1)], 1)
        owner = torch.repeat_interleave(torch.arange(self.num_heads), need)
        column = self._fp_pages[owner] + torch.arange(total) - (torch.cumsum(need, 0) - need)[owner]
        self._fp_table[owner, column] = pages
        self._fp_pages = self._fp_pages + need

    def _write(self, heads: torch.Tensor, slot: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor) -> None:  # fmt: skip
        """Write entries to full-precision slot slot[i] (offset included) of head heads[i]."""
        size = self.block_size
        pages = self._fp_table[heads, slot // size]
        self.pool.write_full(pages, slot % size, keys, values, positions)

    def quantize(self, keep: torch.Tensor | None = None) -> None:
        """Keep entries keep[h, i] (default all) of the full-precision prompt and store
        them quantized: evict, then quantize, as QuantizedKV.from_dense does."""
        if self.quantized or self._q_table.shape[1]:
            raise RuntimeError("the store is already quantized")
        keys, values, positions, live = self._fp_entries()
        if keep is not None:
            index = torch.cumsum(live, dim=1) - 1  # entry number of each live slot
            live = live & keep.to(live.device).gather(1, index.clamp(0, keep.shape[1] - 1))
        lengths = live.sum(dim=1)
        keys, values, positions, _ = _left_pack(keys, values, positions, live)
        self.pool.release(self._fp_table[self._fp_table >= 0].tolist())
        h = self.num_heads
        self._fp_table = torch.full((h, 0), -1, dtype=torch.int64)
        self._fp_pages, self._fp_off, self._fp_len = (torch.zeros(h, dtype=torch.int64) for _ in range(3))
        g = self.pool.group
        n_groups = -(-lengths // g)
        first = lengths - (n_groups - 1).clamp_min(0) * g  # entries of each head's first (possibly short) group
        head = torch.repeat_interleave(torch.arange(h), n_groups)
        nth = torch.arange(len(head)) - (torch.cumsum(n_groups, 0) - n_groups)[head]
        start = torch.where(nth == 0, 0, first[head] + (nth - 1) * g)
        counts = torch.where(nth == 0, first[head], g)
        # Slots past a short group's entries repeat its newest one: the group's range is its entries'.
        entry = start[:, None] + torch.arange(g).clamp_max(counts[:, None] - 1)
        self.quantized = True
        self._add_groups(head, keys[head[:, None], entry], values[head[:, None], entry],
                         positions[head[:, None], entry], counts)  # fmt: skip
        self._sync()

    def _flush(self) -> None:
        """Quantize the oldest G residual entries of every head holding R + G or more."""
        if not self.quantized:
            return
        g, size = self.pool.group, self.block_size
        while True:
            full = (self._fp_len >= self.residual_len + g).nonzero().flatten()
            if not len(full):
                return
            keys, values, positions, _ = self._fp_entries()
            index = self._fp_off[full, None] + torch.arange(g)
            rows = full[:, None]
            group = (keys[rows, index], values[rows, index], positions[rows, index])
            # The residual now starts G later; pages wholly before its start go back first.
            off = self._fp_off[full] + g
            drop = off // size
            for h, k in zip(full.tolist(), drop.tolist(), strict=True):
                if k:
                    pages = self._fp_table[h, :k].tolist()
                    self.pool.release(pages)
                    rest = self._fp_table[h, k:].clone()
                    self._fp_table[h] = -1
                    self._fp_table[h, : len(rest)] = rest
            self._fp_pages[full] -= drop
            self._fp_off[full] = off % size
            self._fp_len[full] -= g
            self._add_groups(full, *group, torch.full((len(full),), g, dtype=torch.int64))

    def _add_groups(self, heads: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    counts: torch.Tensor) -> None:  # fmt: skip
        """Quantize key groups [n, G, d] (values, positions alike) of heads[n], in order,
        and append them as pages of those heads with counts[n] live entries."""
        if not len(heads):
            return
        q = self.pool.quantizer
        codes, scale, zero = q.quantize_key_groups(keys)
        rows = q.quantize_rows(values)
        pages = torch.tensor(self.pool.allocate(len(heads)), dtype=torch.int64)
        self.pool.write_quantized(pages, codes, rows, positions, scale, zero)
        have = (self._q_table >= 0).sum(dim=1)
        per_head = torch.bincount(heads, minlength=self.num_heads)
        width = int((have + per_head).max())
        if width > self._q_table.shape[1]:
            extra = max(width - self._q_table.shape[1], self._q_table.shape[1] // 2)
            self._q_table = torch.cat([self._q_table, self._q_table.new_full((self.num_heads, extra), -1)], 1)
            self._q_count = torch.cat([self._q_count, self._q_count.new_zeros((self.num_heads, extra))], 1)
        order = torch.arange(len(heads)) - (torch.cumsum(per_head, 0) - per_head)[heads]  # heads are sorted
        column = have[heads] + order
        self._q_table[heads, column] = pages
        self._q_count[heads, column] = counts

    def reserve(self, n: int) -> None:
        self._grow(n)

    def trim(self) -> None:
        """Give back full-precision pages past the residual's last entry."""
        size = self.block_size
        keep_pages = -(-(self._fp_off + self._fp_len) // size)
        column = torch.arange(self._fp_table.shape[1])[None, :]
        spare = (column >= keep_pages[:, None]) & (self._fp_table >= 0)
        self.pool.release(self._fp_table[spare].tolist())
        self._fp_table[spare] = -1
        self._fp_pages = keep_pages

    def evict(self, keep: torch.Tensor) -> None:
        """Keep entries keep[h, i] of each head's run (quantized entries, then the
        residual): quantized pages keep their scales and pack their kept entries to the
        front; pages left empty go back; the residual's kept entries are rewritten."""
        if self.num_heads and keep.shape[1] < int(self._host_lengths.max()):
            raise ValueError(f"keep has {keep.shape[1]} columns, fewer than the longest head's entries")
        keep = keep.cpu()
        counts = self._q_count
        n_quant = counts.sum(dim=1)
        if counts.shape[1]:
            self._evict_quantized(keep, counts)
        # The residual: read, keep, give its pages back, write the kept entries from slot 0.
        keys, values, positions, live = self._fp_entries()
        index = n_quant[:, None] + torch.cumsum(live, dim=1) - 1
        live = live & keep.gather(1, index.clamp(0, keep.shape[1] - 1))
        lengths = live.sum(dim=1)
        keys, values, positions, _ = _left_pack(keys, values, positions, live)
        self.pool.release(self._fp_table[self._fp_table >= 0].tolist())
        h = self.num_heads
        self._fp_table = torch.full((h, 0), -1, dtype=torch.int64)
        self._fp_pages, self._fp_off, self._fp_len = (torch.zeros(h, dtype=torch.int64) for _ in range(3))
        self._grow_to(lengths)
        heads, entries = (torch.arange(keys.shape[1])[None, :] < lengths[:, None]).nonzero(as_tuple=True)
        self._write(heads, entries, keys[heads, entries], values[heads, entries], positions[heads, entries])
        self._fp_len = lengths
        self._sync()

    def _grow_to(self, lengths: torch.Tensor) -> None:
        """A fresh residual table with room for lengths[h] entries per head (from slot 0)."""
        need = -(-lengths // self.block_size)
        total = int(need.sum())
        if not total:
            return
        pages = torch.tensor(self.pool.allocate(total), dtype=torch.int64)
        width = int(need.max())
        self._fp_table = torch.full((self.num_heads, width), -1, dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(self.num_heads), need)
        column = torch.arange(total) - (torch.cumsum(need, 0) - need)[owner]
        self._fp_table[owner, column] = pages
        self._fp_pages = need

    def _evict_quantized(self, keep: torch.Tensor, counts: torch.Tensor) -> None:
        g = self.pool.group
        h, width = counts.shape
        start = torch.cumsum(counts, dim=1) - counts  # entry number of each page's slot 0
        slot = torch.arange(g)
        entry = (start[:, :, None] + slot).flatten(1)  # [h, width * G]
        live = slot[None, None, :] < counts[:, :, None]
        kept = live & keep.gather(1, entry.clamp_max(keep.shape[1] - 1)).view(h, width, g)
        new_counts = kept.sum(dim=2)
        changed = (new_counts != counts) & (new_counts > 0)
        if bool(changed.any()):
            pages = self._q_table[changed]
            codes, rows, positions, scale, zero = self.pool.read_quantized(pages)
            # Kept slots first, in order: a stable sort of "dropped" puts them there.
            order = torch.sort((~kept[changed]).to(torch.int8), dim=1, stable=True).indices
            pick = torch.arange(len(pages))[:, None]
            self.pool.write_quantized(pages, codes[pick, order], rows[pick, order], positions[pick, order], scale, zero)
        emptied = (new_counts == 0) & (self._q_table >= 0)
        self.pool.release(self._q_table[emptied].tolist())
        # Pack each head's surviving pages to the front of its row, in order.
        alive = new_counts > 0
        column = torch.sort((~alive).to(torch.int8), dim=1, stable=True).indices
        self._q_table = torch.where(alive, self._q_table, -1).gather(1, column)
        self._q_count = torch.where(alive, new_counts, 0).gather(1, column)
        used = int(alive.sum(dim=1).max()) if h else 0
        self._q_table, self._q_count = self._q_table[:, :used].contiguous(), self._q_count[:, :used].contiguous()

    def max_position(self) -> int:
        _, _, positions, live = self.padded()
        return int(positions[live].max()) if bool(live.any()) else -1


def _left_pack(
    keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, live: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move each head's live entries to the front, in order; pad to the longest head."""
    lengths = live.sum(dim=1)
    longest = int(lengths.max()) if len(lengths) else 0
    order = torch.sort((~live).to(torch.int8), dim=1, stable=True).indices[:, :longest]
    index = order.to(keys.device)
    out_live = (torch.arange(longest)[None, :] < lengths[:, None]).to(keys.device)
    pad = ~out_live[..., None]  # zeros there: a padding slot may hold any bytes of the arena, NaN included
    return (
        keys.gather(1, index[..., None].expand(-1, -1, keys.shape[-1])).masked_fill(pad, 0.0),
        values.gather(1, index[..., None].expand(-1, -1, values.shape[-1])).masked_fill(pad, 0.0),
        positions.gather(1, index),
        out_live,
    )


def append_step(
    stores: Sequence[PagedQuantizedKV], keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> None:
    """One decode step of many stores over one pool: one new entry for every head of
    every store, written into the residuals in one call. keys/values [stores x heads,
    d] (store-major); positions [stores], store i's new position. Heads whose last
    residual page is full take a page first; a store whose residual reaches R + G
    quantizes a group (PagedQuantizedKV.append's rules, one entry at a time)."""
    pool, heads = stores[0].pool, stores[0].num_heads
    size = pool.block_size
    end = torch.cat([kv._fp_off + kv._fp_len for kv in stores])
    full = end >= torch.cat([kv._fp_pages for kv in stores]) * size
    if bool(full.any()):
        for s in full.view(len(stores), heads).any(dim=1).nonzero().flatten().tolist():
            stores[s]._grow(1)
    width = max(kv._fp_table.shape[1] for kv in stores)
    table = torch.cat([F.pad(kv._fp_table, (0, width - kv._fp_table.shape[1]), value=-1) for kv in stores])
    pages = table[torch.arange(len(end)), end // size]
    pool.write_full(pages, end % size, keys, values, positions.repeat_interleave(heads))
    flush_at = stores[0].residual_len + pool.group
    for kv in stores:
        kv._fp_len = kv._fp_len + 1
        if int(kv._fp_len.max()) >= flush_at:
            kv._flush()
            kv._sync()
        else:
            kv._host_lengths = kv._host_lengths + 1
            kv._lengths = kv._host_lengths.to(pool.device)


def pages_to_append(stores: Sequence[PagedQuantizedKV], n: int) -> int:
    """PagedQuantizedKV.blocks_to_append summed over many stores (a sequence's layers),
    from one computation over their heads laid end to end."""
    size = stores[0].block_size
    off = torch.cat([kv._fp_off for kv in stores])
    length = torch.cat([kv._fp_len for kv in stores])
    owned = torch.cat([kv._fp_pages for kv in stores])
    return int((-(-(off + length + n) // size) - owned).clamp_min(0).sum())
