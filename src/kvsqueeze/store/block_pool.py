"""BlockPool: fixed-size blocks of keys, values and positions, shared by every layer.

The KV-Compress layout (arXiv 2410.00161): a block holds `block_size` consecutive
entries of one (layer, sequence, kv-head), so eviction frees memory a block at a time
however unevenly heads are compressed. Which blocks are free, and who holds the
others, is a FreeList (free_list.py).

Blocks are reference-counted: a compressed prefix that many sequences share (the
engine's prefix cache) is held once, and each holder releases its reference; a block
returns to the free list when its last holder lets go.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvsqueeze.store.free_list import FreeList, PoolExhausted

__all__ = ["BlockPool", "PoolExhausted"]


class BlockPool:
    """`num_blocks` blocks of [block_size, head_dim] keys and values, and their positions."""

    def __init__(
        self,
        num_blocks: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = 16,
    ) -> None:
        self.block_size = block_size
        self.keys = torch.zeros(num_blocks, block_size, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.full((num_blocks, block_size), -1, dtype=torch.int32, device=device)
        self._ids = FreeList(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.keys.shape[0]

    @property
    def num_free(self) -> int:
        return self._ids.num_free

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def block_nbytes(self) -> int:
        """Bytes one block holds: its keys, values and positions."""
        return self.bytes_per_block(self.head_dim, self.dtype, self.block_size)

    @staticmethod
    def bytes_per_block(head_dim: int, dtype: torch.dtype, block_size: int = 16) -> int:
        """Bytes of one block of keys, values (dtype) and int32 positions: what sizes a pool."""
        return block_size * (2 * head_dim * torch.empty((), dtype=dtype).element_size() + 4)

    def is_out(self, block: int) -> bool:
        """Whether `block` is allocated (owned by some head)."""
        return self._ids.holders(block) > 0

    def is_shared(self, block: int) -> bool:
        """Whether more than one holder references `block` (writing to it needs a copy)."""
        return self._ids.holders(block) > 1

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks, lowest id first."""
        return self._ids.allocate(n)

    def share(self, blocks: Iterable[int]) -> None:
        """Add a holder to allocated blocks (a forked store or the prefix cache)."""
        self._ids.share(blocks)

    def release(self, blocks: Iterable[int]) -> None:
        """Drop one holder of each block; a block with no holder left returns to the pool."""
        self._ids.release(blocks)
