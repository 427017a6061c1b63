"""QuantizedBlockPool: one byte arena of equal pages, holding KIVI key groups and
full-precision entries alike, shared by every layer of the engine.

KIVI (Liu et al., arXiv 2402.02750) keeps a cache in two parts: quantized groups
(keys per channel over G tokens, values per token over groups of channels) and a
full-precision window of the newest tokens. A paged cache that gives each part its
own pool must split the KV memory between them in advance, and the split is wrong
for every workload but one: a prompt is held in full precision until its policy has
scored it, then it lives quantized. So both parts take pages from one arena:

- a *quantized page* is one key group of one (layer, sequence, kv-head): G entries'
  packed key codes, their value rows (codes, fp16 scales and zeros per channel group;
  store/quantize.py), their int32 positions, and the group's fp16 key scale and zero
  point per channel;
- a *full-precision page* holds `block_size` entries' keys and values in the model's
  dtype and their int32 positions: as many as fit in a quantized page's bytes.

The page size is a quantized page's (or one full-precision entry's, if larger), so
bytes held = pages out x page_nbytes, and at 4 bits a page holds a key group of G
tokens where a bf16 block held about a quarter as many. The scheduler counts pages as
it counted blocks. Reading returns the requested pages' fields as typed views of one
gathered copy; no field is ever read for the whole arena at once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvsqueeze.store.free_list import FreeList
from kvsqueeze.store.quantize import KVQuantizer

# Pages start fields at multiples of this many bytes, so every field views as its dtype.
_ALIGN = 16


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class QuantizedBlockPool:
    """`num_blocks` pages of `page_nbytes` bytes; see the module docstring for layouts."""

    def __init__(
        self,
        num_blocks: int,
        head_dim: int,
        quantizer: KVQuantizer,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if not quantizer.keys_per_channel:
            raise ValueError("the paged quantized store keeps KIVI's per-channel keys only")
        layout = self.layout(head_dim, quantizer, dtype)
        self.quantizer, self.head_dim, self.dtype = quantizer, head_dim, dtype
        self.page_nbytes, self.block_size = layout["page"], layout["block_size"]
        self._offsets = layout
        self.arena = torch.zeros(num_blocks, self.page_nbytes, dtype=torch.uint8, device=device)
        self._ids = FreeList(num_blocks, "page")

    @staticmethod
    def layout(head_dim: int, quantizer: KVQuantizer, dtype: torch.dtype) -> dict[str, int]:
        """Byte offsets of each field in a page, the page size and the full-precision
        entries per page (block_size)."""
        g, d = quantizer.group, head_dim
        key_bytes, row_bytes = quantizer.code_bytes(d), quantizer.row_bytes(d)
        element = torch.empty((), dtype=dtype).element_size()
        q_values = _up(g * key_bytes)
        q_positions = q_values + _up(g * row_bytes)
        q_scale = q_positions + _up(4 * g)
        q_end = q_scale + 4 * d  # scale [d] then zero [d], fp16
        fp_entry = 2 * d * element + 4
        page = _up(max(q_end, fp_entry + 2 * _ALIGN))
        block_size = page // fp_entry
        while _up(block_size * d * element) * 2 + _up(4 * block_size) > page:
            block_size -= 1  # alignment padding pushed the last entry out
        fp_values = _up(block_size * d * element)
        return {
            "page": page,
            "block_size": block_size,
            "q_values": q_values,
            "q_positions": q_positions,
            "q_scale": q_scale,
            "fp_values": fp_values,
            "fp_positions": 2 * fp_values,
        }

    @classmethod
    def page_bytes(cls, head_dim: int, quantizer: KVQuantizer, dtype: torch.dtype) -> int:
        """Bytes of one page: what sizes a pool from a memory budget."""
        return cls.layout(head_dim, quantizer, dtype)["page"]

    # ---------------------------------------------------------------- accounting
    @property
    def num_blocks(self) -> int:
        return self.arena.shape[0]

    @property
    def num_free(self) -> int:
        return self._ids.num_free

    @property
    def device(self) -> torch.device:
        return self.arena.device

    @property
    def group(self) -> int:
        return self.quantizer.group

    @property
    def block_nbytes(self) -> int:
        return self.page_nbytes

    def is_out(self, block: int) -> bool:
        return self._ids.holders(block) > 0

    def is_shared(self, block: int) -> bool:
        """Pages are never shared (the quantized engine has no prefix cache)."""
        return False

    def allocate(self, n: int) -> list[int]:
        return self._ids.allocate(n)

    def release(self, pages: Iterable[int]) -> None:
        self._ids.release(pages)

    # ---------------------------------------------------------------- quantized pages
    def read_quantized(
        self, pages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantized pages [...] (ids >= 0) to (key codes [..., G, key bytes], value rows
        [..., G, row bytes], positions [..., G] int32, key scale [..., d] fp16, key zero
        [..., d] fp16): views of one gathered copy of those pages."""
        raw = self._gather(pages)
        o, g, d = self._offsets, self.group, self.head_dim
        key_bytes, row_bytes = self.quantizer.code_bytes(d), self.quantizer.row_bytes(d)
        codes = raw[..., : g * key_bytes].unflatten(-1, (g, key_bytes))
        rows = raw[..., o["q_values"] : o["q_values"] + g * row_bytes].unflatten(-1, (g, row_bytes))
        positions = raw[..., o["q_positions"] : o["q_positions"] + 4 * g].view(torch.int32)
        meta = raw[..., o["q_scale"] : o["q_scale"] + 4 * d].view(torch.float16)
        return codes, rows, positions, meta[..., :d], meta[..., d:]

    def write_quantized(
        self,
        pages: torch.Tensor,
        codes: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
    ) -> None:
        """Write whole quantized pages [n]: codes [n, G, key bytes], rows [n, G, row
        bytes], positions [n, G], scale and zero [n, d]."""
        o, n = self._offsets, len(pages)
        page = torch.zeros(n, self.page_nbytes, dtype=torch.uint8, device=self.device)
        page[:, : codes[0].numel()] = codes.reshape(n, -1)
        page[:, o["q_values"] : o["q_values"] + rows[0].numel()] = rows.reshape(n, -1)
        pos = positions.to(torch.int32).contiguous().view(torch.uint8).reshape(n, -1)
        page[:, o["q_positions"] : o["q_positions"] + pos.shape[1]] = pos
        meta = torch.cat([scale, zero], dim=-1).to(torch.float16).contiguous().view(torch.uint8)
        page[:, o["q_scale"] : o["q_scale"] + meta.shape[1]] = meta
        self.arena[pages.to(self.device)] = page

    # ---------------------------------------------------------------- full-precision pages
    def read_full(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-precision pages [...] to (keys [..., block_size, d], values, positions
        [..., block_size] int32): views of one gathered copy."""
        raw = self._gather(pages)
        o, b, d = self._offsets, self.block_size, self.head_dim
        n = b * d * torch.empty((), dtype=self.dtype).element_size()
        keys = raw[..., :n].view(self.dtype).unflatten(-1, (b, d))
        values = raw[..., o["fp_values"] : o["fp_values"] + n].view(self.dtype).unflatten(-1, (b, d))
        positions = raw[..., o["fp_positions"] : o["fp_positions"] + 4 * b].view(torch.int32)
        return keys, values, positions

    def write_full(self, pages: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   positions: torch.Tensor) -> None:  # fmt: skip
        """Write entries [n] to slot slots[n] of full-precision page pages[n]: keys and
        values [n, d] (cast to the pool's dtype), positions [n]."""
        if not len(pages):
            return
        o, n = self._offsets, len(pages)
        row = self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        start = pages.to(self.device).long() * self.page_nbytes
        slots = slots.to(self.device).long()
        # One write of every byte: each entry's key, value and position bytes at their offsets.
        offsets = torch.cat([
            torch.arange(row, device=self.device)[None, :] + slots[:, None] * row,
            o["fp_values"] + torch.arange(row, device=self.device)[None, :] + slots[:, None] * row,
            o["fp_positions"] + torch.arange(4, device=self.device)[None, :] + slots[:, None] * 4,
        ], dim=1)  # fmt: skip
        data = torch.cat([
            keys.to(self.dtype).contiguous().view(torch.uint8).reshape(n, row),
            values.to(self.dtype).contiguous().view(torch.uint8).reshape(n, row),
            positions.to(self.device, torch.int32).contiguous().view(torch.uint8).reshape(n, 4),
        ], dim=1)  # fmt: skip
        self.arena.view(-1)[start[:, None] + offsets] = data

    def _gather(self, pages: torch.Tensor) -> torch.Tensor:
        """Pages [...] (negative ids read page 0: callers mask them) as [..., page bytes]."""
        ids = pages.to(self.device).long().clamp_min(0)
        return self.arena.index_select(0, ids.flatten()).view(*pages.shape, self.page_nbytes)
