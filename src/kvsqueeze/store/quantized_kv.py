"""QuantizedKV: a layer's kept K/V as KIVI codes, the newest entries in full precision.

KIVI (arXiv 2402.02750) quantizes keys per channel over groups of G tokens, so a
key can be quantized only once its group is complete; until then, and for the R most
recent tokens (the ones attention leans on most), entries stay in full precision.
Each head here is an ordered run of quantized entries followed by a full-precision
residual run: a head's residual holds between R and R + G - 1 entries (fewer only
while the head is short or after eviction), and an append that brings it to R + G
quantizes its oldest G entries as one group.

Three FlatKVs (store/flat_kv.py) hold it, so ragged heads, slack on growth and
compaction on eviction are FlatKV's:
- `codes`: one row per quantized entry: keys' packed codes (per-channel keys) or
  self-contained rows (per-token keys), values' self-contained rows (codes, fp16
  scales, fp16 zeros; store/quantize.py), and the entry's position;
- `groups`: one row per key group: keys = fp16 scales [d], values = fp16 zeros [d],
  and in the position column the number of live entries of the group (eviction
  drops entries from a group without touching the codes or scales of the others);
- `residual`: the full-precision entries.

Policies score the full-precision prefill; `from_dense` then quantizes only what
they kept (evict, then quantize). Eviction later works on quantized entries in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from kvsqueeze.store.base import KVStore
from kvsqueeze.store.flat_kv import FlatKV, run_indices
from kvsqueeze.store.quantize import KVQuantizer, unpack

# Bounds that turn a mistyped flag into an error rather than a store that never
# quantizes anything or an overflow in index math.
MAX_GROUP = 4096
MAX_RESIDUAL = 2**20


class QuantizedKV(KVStore):
    """Ragged per-head K/V for one layer, quantized KIVI-style. Knows nothing of models."""

    def __init__(self, quantizer: KVQuantizer, residual_len: int, codes: FlatKV, groups: FlatKV, residual: FlatKV):
        self.quantizer, self.residual_len = quantizer, residual_len
        self.codes, self.groups, self.residual = codes, groups, residual

    # ---------------------------------------------------------------- building
    @classmethod
    def from_dense(
        cls,
        keys: torch.Tensor,
        values: torch.Tensor,
        keep: torch.Tensor,
        positions: torch.Tensor | None = None,
        *,
        quantizer: KVQuantizer,
        residual_len: int = 128,
    ) -> QuantizedKV:
        """Keep entries keep[h, t] of dense keys/values [heads, tokens, d] (as
        FlatKV.from_dense), then quantize each head's oldest kept entries in whole
        groups, leaving at least `residual_len` of its newest in full precision."""
        if residual_len < 0:
            raise ValueError(f"the residual window must be >= 0 tokens, got {residual_len}")
        d, g = keys.shape[-1], quantizer.group
        quantizer.code_bytes(d)  # a head_dim the quantizer cannot split fails here, not mid-decode
        full = FlatKV.from_dense(keys, values, keep, positions)
        n_quant = (full.lengths - residual_len).clamp_min(0) // g * g
        slots, _ = run_indices(full.starts, n_quant)
        heads = full.num_heads
        # Heads' quantized runs are whole groups, so their concatenation is [groups, G, d].
        key_part, scale, zero = _quantize_keys(quantizer, full.keys[slots].view(-1, g, d))
        value_rows = quantizer.quantize_rows(full.values[slots])
        codes = FlatKV(key_part.flatten(0, 1), value_rows, full.positions[slots], n_quant, n_quant.clone())
        n_groups = n_quant // g if quantizer.keys_per_channel else torch.zeros_like(n_quant)
        counts = torch.full((len(scale),), g, dtype=torch.int32, device=keys.device)
        groups = FlatKV(scale, zero, counts, n_groups, n_groups.clone())
        index = torch.arange(keep.shape[-1], device=keys.device).expand(heads, -1)
        full.evict(index >= n_quant[:, None])  # what stays is the residual
        return cls(quantizer, residual_len, codes, groups, full)

    # ---------------------------------------------------------------- queries
    @property
    def lengths(self) -> torch.Tensor:
        return self.codes.lengths + self.residual.lengths

    @property
    def head_dim(self) -> int:
        return self.residual.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.residual.dtype

    @property
    def nbytes(self) -> int:
        """Codes, scales, zero points, group counts, positions and the full-precision
        residual, with their slack: every tensor the store holds."""
        return self.codes.nbytes + self.groups.nbytes + self.residual.nbytes

    def max_position(self) -> int:
        return max(self.codes.max_position(), self.residual.max_position())

    def head(self, h: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head h's entries, the quantized ones dequantized (a copy), then the residual."""
        key_part, value_rows, positions = self.codes.head(h)
        scale, zero, counts = self.groups.head(h)
        d, q = self.head_dim, self.quantizer
        if q.keys_per_channel:
            counts = counts.long()
            keys = q.dequantize_keys(key_part, scale.repeat_interleave(counts, 0), zero.repeat_interleave(counts, 0))
        else:
            keys = q.dequantize_rows(key_part, d)
        r_keys, r_values, r_positions = self.residual.head(h)
        return (
            torch.cat([keys.to(self.dtype), r_keys]),
            torch.cat([q.dequantize_rows(value_rows, d).to(self.dtype), r_values]),
            torch.cat([positions, r_positions]),
        )

    def dequantized(self) -> FlatKV:
        """A full-precision FlatKV of the same entries (a copy of the whole cache: for
        tests and for paths that have no quantized kernel)."""
        runs = list(self.runs())
        return FlatKV(
            torch.cat([k for k, _, _ in runs]),
            torch.cat([v for _, v, _ in runs]),
            torch.cat([p for _, _, p in runs]).to(torch.int32),
            self.lengths.clone(),
            self.lengths.clone(),
        )

    def blocks(
        self, block: int, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every head's entries about `block` at a time, as (keys [heads, b, d], values,
        positions [heads, b], live [heads, b]) padded across heads: the quantized runs
        dequantized one block at a time, then the residual. Only one block is ever in
        full precision.

        Two common layouts take shortcuts: when every head has the same capacity (a
        batch without per-head budgets) a block is a strided view of the codes, not a
        gather; when no group has lost entries to eviction (always, short of eviction
        during decoding) token i's key group is i // G and a block of whole groups
        scales its codes by broadcasting, with no per-token gather of scales."""
        heads, d, q = self.num_heads, self.head_dim, self.quantizer
        lengths = self.codes.lengths
        longest = int(lengths.max()) if heads else 0
        if longest:
            scale, zero, counts, group_live = self.groups.padded()
            g = q.group
            aligned = q.keys_per_channel and bool((counts[group_live] == g).all())
            block = -(-block // g) * g if aligned else block
            if aligned:
                scale, zero = scale.to(dtype), zero.to(dtype)
            elif q.keys_per_channel:
                # End (exclusive) of each group within its head's run; padding groups add nothing.
                group_ends = torch.cumsum(torch.where(group_live, counts, 0), dim=1)
                first_group = torch.arange(heads, device=lengths.device)[:, None] * scale.shape[1]
                scale, zero = scale.flatten(0, 1), zero.flatten(0, 1)
            capacity = self.codes.capacity
            uniform = bool((capacity == capacity[0]).all())
        for start in range(0, longest, block):
            stop = min(start + block, longest)
            index = torch.arange(start, stop, device=lengths.device).expand(heads, -1)
            live = index < lengths[:, None]
            if uniform:  # head h owns slots [h * capacity, (h + 1) * capacity): a view
                cap = int(capacity[0])
                key_part = self.codes.keys.view(heads, cap, -1)[:, start:stop]
                value_rows = self.codes.values.view(heads, cap, -1)[:, start:stop]
                positions = self.codes.positions.view(heads, cap)[:, start:stop]
            else:
                slots = torch.where(live, self.codes.slots(index), 0)
                key_part, value_rows = _rows(self.codes.keys, slots), _rows(self.codes.values, slots)
                positions = _rows(self.codes.positions, slots)
            if aligned:  # stop is a whole number of groups: every quantized run is
                span = slice(start // g, stop // g)
                codes = unpack(key_part, q.bits).to(dtype).unflatten(1, (-1, g))
                keys = torch.addcmul(zero[:, span, None], codes, scale[:, span, None]).flatten(1, 2)
            elif q.keys_per_channel:
                group = torch.searchsorted(group_ends, index.contiguous(), right=True)
                group = group.clamp_max(group_ends.shape[1] - 1) + first_group
                keys = q.dequantize_keys(key_part, _rows(scale, group), _rows(zero, group), dtype)
            else:
                keys = q.dequantize_rows(key_part, d, dtype)
            yield keys, q.dequantize_rows(value_rows, d, dtype), positions, live
        keys, values, positions, live = self.residual.padded()
        yield keys.to(dtype), values.to(dtype), positions, live

    # ---------------------------------------------------------------- updates
    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Append to the residual, then quantize a group of every head whose residual
        reached R + G (several, for a chunk longer than G)."""
        self.residual.append(keys, values, positions, valid)
        while self._flush():
            pass

    def _flush(self) -> bool:
        """Quantize the oldest G residual entries of every head holding R + G or more;
        False when no head does."""
        g = self.quantizer.group
        full = self.residual.lengths >= self.residual_len + g
        if not bool(full.any()):
            return False
        heads = self.num_heads
        index = torch.arange(g, device=full.device).expand(heads, -1)
        slots = self.residual.slots(index)[full]  # [flushed heads, G]
        key_part, scale, zero = _quantize_keys(self.quantizer, self.residual.keys[slots])
        value_rows = self.quantizer.quantize_rows(self.residual.values[slots])
        self.codes.append(
            _scatter_heads(key_part, full),
            _scatter_heads(value_rows, full),
            _scatter_heads(self.residual.positions[slots], full),
            full[:, None].expand(heads, g),
        )
        if self.quantizer.keys_per_channel:
            counts = torch.full((heads, 1), g, dtype=torch.int32, device=full.device)
            self.groups.append(
                _scatter_heads(scale[:, None], full), _scatter_heads(zero[:, None], full), counts, full[:, None]
            )
        longest = int(self.residual.lengths.max())
        keep = torch.arange(longest, device=full.device)[None, :] >= torch.where(full, g, 0)[:, None]
        self.residual.evict(keep)
        self.residual.reserve(g)  # eviction left it tight: room for the next group's appends
        return True

    def reserve(self, n: int) -> None:
        g = self.quantizer.group
        self.residual.reserve(min(n, g))  # it never holds more than R + G - 1 between appends
        self.codes.reserve(n)
        self.groups.reserve(n // g + 1)

    def trim(self) -> None:
        for part in (self.codes, self.groups, self.residual):
            part.trim()

    def evict(self, keep: torch.Tensor) -> None:
        """Keep entries keep[h, i] of each head's run (quantized entries first, then the
        residual). Kept quantized entries keep their codes and their group's scale and
        zero point; a group left empty is dropped."""
        lengths = self.lengths
        if self.num_heads and keep.shape[1] < int(lengths.max()):
            raise ValueError(f"keep has {keep.shape[1]} columns, fewer than the longest head's entries")
        n_quant = self.codes.lengths
        longest_q = int(n_quant.max()) if self.num_heads else 0
        keep_quant = keep[:, :longest_q] & (torch.arange(longest_q, device=keep.device) < n_quant[:, None])
        if self.quantizer.keys_per_channel and longest_q:
            _, _, counts, group_live = self.groups.padded()
            group_ends = torch.cumsum(torch.where(group_live, counts, 0), dim=1)
            index = torch.arange(longest_q, device=keep.device).expand(self.num_heads, -1).contiguous()
            group = torch.searchsorted(group_ends, index, right=True).clamp_max(counts.shape[1] - 1)
            kept = torch.zeros_like(counts).scatter_add_(1, group, keep_quant.to(counts.dtype))
            alive = group_live & (kept > 0)
            self.groups.evict(alive)
            self.groups.positions = kept[alive].to(torch.int32)
        self.codes.evict(keep_quant)
        longest_r = int(self.residual.lengths.max()) if self.num_heads else 0
        index = n_quant[:, None] + torch.arange(longest_r, device=keep.device)
        self.residual.evict(keep.gather(1, index.clamp_max(keep.shape[1] - 1)))


def _quantize_keys(quantizer: KVQuantizer, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key groups [n, G, d] to (per-entry key part [n, G, bytes], scale [n, d], zero
    [n, d]); with per-token keys the rows carry their own scales and no group has any."""
    if quantizer.keys_per_channel:
        return quantizer.quantize_key_groups(keys)
    empty = keys.new_empty((0, keys.shape[-1]), dtype=torch.float16)
    return quantizer.quantize_rows(keys), empty, empty


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] for an index of any shape into x's first axis: index_select copies whole
    rows, several times faster on CPU than advanced indexing for short rows."""
    return x.index_select(0, index.flatten()).view(*index.shape, *x.shape[1:])


def _scatter_heads(rows: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """rows of the chosen heads [chosen, ...] into a [heads, ...] tensor (the others'
    rows are skipped by the append's valid mask, so they are left zero)."""
    out = rows.new_zeros((len(chosen), *rows.shape[1:]))
    out[chosen] = rows
    return out


KV_BITS = (16, 8, 4, 2)


@dataclass(frozen=True)
class KVQuantConfig:
    """How a cache stores its kept K/V: `bits` 16 keeps them as they are (FlatKV);
    8, 4 or 2 quantizes them KIVI-style (arXiv 2402.02750) in groups of `group`,
    with the `residual` newest entries of each head in full precision. `key_axis`
    "token" is the naive per-token baseline."""

    bits: int = 16
    group: int = 32
    residual: int = 128
    key_axis: Literal["channel", "token"] = "channel"

    def __post_init__(self) -> None:
        if self.bits not in KV_BITS:
            raise ValueError(f"kv bits must be one of {KV_BITS}, got {self.bits}")
        if not 1 <= self.group <= MAX_GROUP:
            raise ValueError(f"kv group must be between 1 and {MAX_GROUP} tokens, got {self.group}")
        if not 0 <= self.residual <= MAX_RESIDUAL:
            raise ValueError(f"kv residual must be between 0 and {MAX_RESIDUAL} tokens, got {self.residual}")
        if self.bits < 16:
            KVQuantizer(self.bits, self.group, self.key_axis)

    @property
    def quantizes(self) -> bool:
        return self.bits < 16

    def describe(self) -> str:
        if not self.quantizes:
            return "kv16"
        naive = "-per-token" if self.key_axis == "token" else ""
        return f"kv{self.bits}{naive} g{self.group} r{self.residual}"

    def store_factory(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], KVStore]:
        """(keys, values, keep, positions) -> the store of the kept entries, for
        CompressedLayer's make_store."""
        if not self.quantizes:
            return FlatKV.from_dense
        quantizer = KVQuantizer(self.bits, self.group, self.key_axis)
        return functools.partial(QuantizedKV.from_dense, quantizer=quantizer, residual_len=self.residual)
