"""QuantizedKV: a layer's kept K/V as KIVI codes, the newest decoded entries in full precision.

KIVI (arXiv 2402.02750) quantizes keys per channel over groups of G tokens and values
per token over groups of channels; the R most recent tokens stay in full precision
until a group fills, because attention during decoding leans on them most. Here:

- The prefill is quantized whole: every entry a policy kept, in key groups counted
  from each head's newest entry back, so a head of n entries holds n // G whole groups
  and, when G does not divide n, one shorter *first* group (its oldest n % G entries)
  with its own scales and zero points. Nothing of the prompt stays in full precision:
  a full-precision tail would cost (R + up to G - 1) tokens at 2 bytes an element, 6-8%
  of a 2k-token cache and a quarter of a head that keeps 512, and a large key group
  (the compact setting, G = 256) would leave hundreds of entries of a compressed head
  unquantized.
- Decoded entries go to a full-precision residual; an append that brings a head's
  residual to R + G quantizes its oldest G entries as one group, so while decoding
  the newest entries are exact: every decoded one until R + G, then the R to R + G - 1
  newest (KIVI's recent window).

So every key group is whole except possibly each head's first (until eviction during
decoding shrinks others), and token i of a head is in group (i + shift) // G with
shift = G - (first group's size): attention reads whole groups by broadcasting their
scales (blocks()).

Positions are int16 while every position the store has seen is below 2**15 (a model
with a context of at most 32k, e.g. SmolLM2's 8k: 2 bytes an entry instead of 4, 1.6%
of a bf16 K/V pair at head_dim 64), int32 otherwise: an append that brings a larger
position widens them once.

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

Bytes per entry and head at head_dim d, b bits: 2·d·b/8 codes, 4·d/G key scale and
zero, 4·d/min(G, d) value scale and zero, 2 (int16) position. At d = 64 and G = 256
(value groups span the whole head) that is 135 / 71 / 39 bytes at int8 / int4 / int2
against 256 for a bf16 K/V pair: 0.527 / 0.277 / 0.152 of full; at the default
G = 32: 0.570 / 0.320 / 0.195.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from kvsqueeze.store.base import KVStore, StoreMark, check_truncation
from kvsqueeze.store.flat_kv import FlatKV
from kvsqueeze.store.quantize import KVQuantizer, unpack

# Bounds that turn a mistyped flag into an error rather than a store that never
# quantizes anything or an overflow in index math.
MAX_GROUP = 4096
MAX_RESIDUAL = 2**20
# The largest position int16 holds: positions up to it are stored in 2 bytes.
INT16_POSITION_MAX = 2**15 - 1


def position_dtype(max_position: int) -> torch.dtype:
    """int16 when every position is at most INT16_POSITION_MAX, else int32."""
    return torch.int16 if max_position <= INT16_POSITION_MAX else torch.int32


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
        FlatKV.from_dense), then quantize all of them: each head's key groups counted
        from its newest entry back, the oldest n % G entries a shorter first group.
        `residual_len` is the full-precision window decode appends fill (append())."""
        if residual_len < 0:
            raise ValueError(f"the residual window must be >= 0 tokens, got {residual_len}")
        d = keys.shape[-1]
        quantizer.code_bytes(d)  # a head_dim the quantizer cannot split fails here, not mid-decode
        full = FlatKV.from_dense(keys, values, keep, positions)  # tight: head h's run starts where h - 1's ends
        lengths = full.lengths
        if quantizer.keys_per_channel:
            key_part, scale, zero, counts, n_groups = _quantize_runs(quantizer, full.keys, lengths)
        else:
            key_part, scale, zero = _quantize_keys(quantizer, full.keys)
            counts, n_groups = torch.zeros(0, dtype=torch.int32, device=keys.device), torch.zeros_like(lengths)
        pos = full.positions.to(position_dtype(full.max_position()))
        codes = FlatKV(key_part, quantizer.quantize_rows(full.values), pos, lengths, lengths.clone())
        groups = FlatKV(scale, zero, counts, n_groups, n_groups.clone())
        none = torch.zeros_like(lengths)
        residual = FlatKV(keys.new_empty((0, d)), values.new_empty((0, d)), pos[:0].clone(), none, none.clone())
        return cls(quantizer, residual_len, codes, groups, residual)

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
            torch.cat([positions, r_positions]).to(torch.int32),  # a copy: int32 whatever the store holds
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
        dequantized one block at a time, then the residual (when it holds any). Only
        one block is ever in full precision.

        Two common layouts take shortcuts. When every group of a head is whole but its
        first (always, short of eviction inside later groups during decoding), head h's
        entry i is in group (i + shift[h]) // G: blocks are cut at whole groups of that
        shifted index (the first `shift` slots of a head's first group are padding) and
        scale their codes by broadcasting, with no per-token gather of scales. When, in
        addition, no head is shifted and every head has the same capacity (a batch
        without per-head budgets whose prompt fills whole groups), a block of codes is a
        strided view, not a gather."""
        heads, d, q = self.num_heads, self.head_dim, self.quantizer
        lengths = self.codes.lengths
        longest = int(lengths.max()) if heads else 0
        aligned = shifted = uniform = False
        if longest:
            scale, zero, counts, group_live = self.groups.padded()
            g = q.group
            aligned = q.keys_per_channel and bool((counts[:, 1:][group_live[:, 1:]] == g).all())
            if aligned:
                shift = torch.where(group_live[:, 0], g - counts[:, 0].long(), 0)
                shifted = bool(shift.any())
                longest = int((lengths + shift).max())  # a whole number of groups
                block = -(-block // g) * g
                scale, zero = scale.to(dtype), zero.to(dtype)
            elif q.keys_per_channel:
                # End (exclusive) of each group within its head's run; padding groups add nothing.
                group_ends = torch.cumsum(torch.where(group_live, counts, 0), dim=1)
                first_group = torch.arange(heads, device=lengths.device)[:, None] * scale.shape[1]
                scale, zero = scale.flatten(0, 1), zero.flatten(0, 1)
            capacity = self.codes.capacity
            uniform = not shifted and bool((capacity == capacity[0]).all())
        for start in range(0, longest, block):
            stop = min(start + block, longest)
            index = torch.arange(start, stop, device=lengths.device).expand(heads, -1)
            if shifted:
                index = index - shift[:, None]
                live = (index >= 0) & (index < lengths[:, None])
            else:
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
            if aligned:  # start and stop are whole groups of the shifted index
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
        if self.num_heads and int(self.residual.lengths.max()):  # empty right after the prefill: no empty block
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
        reached R + G (several, for a chunk longer than G). A position past int16's
        range widens the store's positions to int32 first."""
        if self.residual.positions.dtype != torch.int32 and positions.numel():
            if int(positions.max()) > INT16_POSITION_MAX:
                for part in (self.codes, self.residual):
                    part.positions = part.positions.to(torch.int32)
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
        self.residual.reserve(min(n, self.residual_len + g))  # it never holds more than R + G - 1 between appends
        self.codes.reserve(n)
        self.groups.reserve(n // g + 1)

    def trim(self) -> None:
        for part in (self.codes, self.groups, self.residual):
            part.trim()

    def truncate(self, lengths: torch.Tensor) -> None:
        """Keep each head's first lengths[h] entries (KVStore.truncate). Only the
        full-precision residual can lose entries: quantized ones are refused."""
        lengths = check_truncation(self.lengths, lengths)
        quantized = self.codes.lengths
        short = (lengths < quantized).nonzero().flatten().tolist()
        if short:
            h = short[0]
            raise ValueError(
                f"cannot truncate head {h} to {int(lengths[h])} entries: its first {int(quantized[h])} are "
                f"quantized, and only the full-precision residual (the newest entries) can be dropped"
            )
        self.residual.truncate(lengths - quantized)

    def mark(self) -> StoreMark:
        return StoreMark(self.lengths, self.codes.lengths.clone())

    def check_rollback(self, mark: StoreMark) -> None:
        """KVStore.check_rollback. A rollback is refused once a group appended since the
        mark was quantized (its entries left the residual): the store cannot return
        exactly to the mark then. rollback_room() says how many appends are safe."""
        if mark.quantized is None or not torch.equal(self.codes.lengths, mark.quantized):
            raise ValueError(
                "cannot roll this quantized store back to the mark: entries appended since were quantized "
                "(a residual group filled), or the mark is not a quantized store's"
            )
        check_truncation(self.lengths, mark.lengths)

    def rollback_room(self) -> int:
        """Appends quantize a head's oldest residual group once it holds R + G entries:
        up to R + G - 1 - (the longest residual) more entries per head leave every
        quantized entry as it is."""
        longest = int(self.residual.lengths.max()) if self.num_heads else 0
        return max(0, self.residual_len + self.quantizer.group - 1 - longest)

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


def _quantize_runs(
    quantizer: KVQuantizer, keys: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel key groups of heads' runs laid end to end (keys [sum(lengths), d],
    head h's run after h - 1's), counted from each head's newest entry back: head h
    has ceil(n / G) groups, the first holding its oldest n - (groups - 1) * G entries.
    Returns (codes [sum(lengths), bytes] in run order, scale [groups, d], zero [groups,
    d], live entries per group [groups] int32, groups per head [heads])."""
    g = quantizer.group
    n_groups = -(-lengths // g)
    shift = n_groups * g - lengths  # head h's entry i sits at i + shift[h] of its whole groups
    head = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), n_groups)
    nth = torch.arange(len(head), device=lengths.device) - (torch.cumsum(n_groups, 0) - n_groups)[head]
    entry = nth[:, None] * g + torch.arange(g, device=lengths.device) - shift[head, None]  # [groups, G]
    live = entry >= 0
    counts = live.sum(dim=1, dtype=torch.int32)
    if not bool(shift.any()):  # every run fills whole groups: they lie in order, a view
        codes, scale, zero = quantizer.quantize_key_groups(keys.view(-1, g, keys.shape[-1]))
        return codes.flatten(0, 1), scale, zero, counts, n_groups
    # A first group's padding slots repeat its oldest entry: the group's min and max, and
    # so its scale and zero point, are those of its live entries alone.
    index = (torch.cumsum(lengths, 0) - lengths)[head, None] + entry.clamp_min(0)
    codes, scale, zero = quantizer.quantize_key_groups(keys[index])
    return codes[live], scale, zero, counts, n_groups


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
# Tokens per key group that bring int8 / int4 / int2 under 0.53 / 0.28 / 0.16 of a bf16
# cache at head_dim 64 (0.527 / 0.277 / 0.152 with int16 positions), int4 at keep 0.25
# under 0.08 (the default 32, KIVI's finer groups, stores 0.571 / 0.321 / 0.196).
COMPACT_GROUP = 256


@dataclass(frozen=True)
class KVQuantConfig:
    """How a cache stores its kept K/V: `bits` 16 keeps them as they are (FlatKV);
    8, 4 or 2 quantizes them KIVI-style (arXiv 2402.02750): keys per channel over
    groups of `group` tokens, values per token over groups of min(`group`, head_dim)
    channels. The prefill is quantized whole; while decoding, the `residual` to
    `residual` + `group` - 1 newest entries of each head stay in full precision.
    `key_axis` "token" is the naive per-token baseline.

    COMPACT_GROUP (`--kv-group 256`) is the setting that meets issue 13's byte
    targets on SmolLM2-135M (head_dim 64): value groups span the whole head and a
    key group's scales cost one byte per token (docs/results/kv_quantization)."""

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

    def store_factory(
        self, quantizer_type: type[KVQuantizer] = KVQuantizer
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], KVStore]:
        """(keys, values, keep, positions) -> the store of the kept entries, for
        CompressedLayer's make_store; quantizer_type: KVQuantizer or a subclass with
        faster kernels (ops/cpu_quantize.py)."""
        if not self.quantizes:
            return FlatKV.from_dense
        quantizer = quantizer_type(self.bits, self.group, self.key_axis)
        return functools.partial(QuantizedKV.from_dense, quantizer=quantizer, residual_len=self.residual)
