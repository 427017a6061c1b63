"""BlockManager: every running sequence's KV, per layer, in one shared block pool.

The KV-Compress layout (arXiv 2410.00161): one BlockPool holds fixed-size blocks for
all layers; each (layer, sequence) has its own PagedKV, i.e. a block table per
(layer, sequence, kv-head). A sequence joins with its first prefill chunk, grows a
block at a time per head, shrinks when its policy evicts (freed blocks go straight
back to the pool) and leaves when it finishes or is preempted. The scheduler asks
here how many blocks a step needs, so it admits sequences by their real,
compressed footprint. Compressed shared prefixes live in its PrefixCache, as forks
of the stores of the sequence that computed them.

With a KVQuantConfig of 8, 4 or 2 bits the pool is a QuantizedBlockPool (KIVI, arXiv
2402.02750): pages of one byte size hold either a quantized key group or a few
full-precision entries, each (layer, sequence) a PagedQuantizedKV, and the KV memory
buys as many pages as its bytes hold; `block_size` is then the full-precision entries
per page, which the pool works out from the quantization settings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvsqueeze.engine.footprint import peak_blocks, peak_pages_quantized
from kvsqueeze.engine.prefix_cache import PrefixCache, PrefixKey
from kvsqueeze.engine.sequence import Sequence
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.ops.cpu_extension import cpu_kernels_available
from kvsqueeze.ops.cpu_paged_decode import blocks_needed_cpu
from kvsqueeze.ops.cpu_quantize import CpuKVQuantizer
from kvsqueeze.store import BlockPool, PagedKV
from kvsqueeze.store.paged_quantized_kv import PagedQuantizedKV, pages_to_append
from kvsqueeze.store.quantized_block_pool import QuantizedBlockPool
from kvsqueeze.store.quantized_kv import KVQuantConfig


class BlockManager:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_memory: int,
        block_size: int = 16,
        quant: KVQuantConfig | None = None,
    ) -> None:
        self.quant = quant if quant is not None and quant.quantizes else None
        if self.quant is not None:
            quantizer = CpuKVQuantizer(self.quant.bits, self.quant.group, self.quant.key_axis)
            layout = QuantizedBlockPool.layout(head_dim, quantizer, dtype)
            block_size, block_nbytes = layout["block_size"], layout["page"]
        else:
            block_nbytes = BlockPool.bytes_per_block(head_dim, dtype, block_size)
        num_blocks = kv_memory // block_nbytes
        if num_blocks < num_layers * num_kv_heads:
            raise ValueError(
                f"kv_memory of {kv_memory} bytes holds {num_blocks} blocks of {block_nbytes} bytes: fewer than one "
                f"per (layer, kv-head) ({num_layers * num_kv_heads}); give the cache more memory"
            )
        try:
            if self.quant is not None:
                self.pool: BlockPool | QuantizedBlockPool = QuantizedBlockPool(
                    num_blocks, head_dim, quantizer, dtype, device
                )
            else:
                self.pool = BlockPool(num_blocks, head_dim, dtype, device, block_size)
        except (RuntimeError, MemoryError, TypeError, OverflowError):  # torch: out of memory, or past int64
            raise KVSqueezeError(
                f"cannot allocate a KV pool of {kv_memory} bytes on {device}: give --kv-memory what the device holds"
            ) from None
        self.num_layers, self.num_kv_heads, self.block_size = num_layers, num_kv_heads, block_size
        self._cpu_kernels = self.pool.device.type == "cpu" and cpu_kernels_available() and self.quant is None
        # seq_id -> per layer (None until it joins that layer)
        self.kv: dict[int, list[PagedKV | PagedQuantizedKV | None]] = {}
        self.on_free: list[Callable[[int], None]] = []  # told of every sequence whose blocks are freed
        self.prefixes = PrefixCache()

    # ------------------------------------------------------------------ accounting
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    def blocks_for(self, seq_id: int, n_tokens: int) -> int:
        """Blocks the sequence must take to add n_tokens to every head of every layer."""
        layers = self.kv.get(seq_id)
        fresh = -(-n_tokens // self.block_size) * self.num_kv_heads
        if layers is None:
            return fresh * self.num_layers
        stored = [kv for kv in layers if kv is not None]
        total = fresh * (len(layers) - len(stored))
        return total + (self._blocks_needed(stored, n_tokens) if stored else 0)

    def _blocks_needed(self, stores: list, n_tokens: int) -> int:
        """Blocks the stores' heads take to grow by n_tokens; this runs for every running
        sequence at every step, so on the CPU one C++ call does it."""
        if self.quant is not None:
            return pages_to_append(stores, n_tokens)
        if self._cpu_kernels:
            return blocks_needed_cpu(stores, n_tokens)
        size, total = self.block_size, 0
        for kv in stores:
            lengths, owned = kv.host_lengths.tolist(), kv.num_blocks.tolist()
            total += sum(max(0, -(-(n + n_tokens) // size) - b) for n, b in zip(lengths, owned, strict=True))
        return total

    def blocks_for_fork(self, layers: list[PagedKV], n_tokens: int) -> int:
        """Blocks a sequence forking `layers` (a cached prefix) takes to add n_tokens:
        new blocks, plus a private copy of every partly filled shared last block."""
        size = self.block_size
        return sum(-(-(n + n_tokens) // size) - n // size for kv in layers for n in kv.lengths.tolist())

    def peak_blocks(self, seq: Sequence) -> tuple[int, int]:
        """Blocks (pages) `seq` holds at its largest: before and after its prompt is
        compressed (engine/footprint.py)."""
        if self.quant is not None:
            q = self.quant
            return peak_pages_quantized(seq, self.num_layers, self.num_kv_heads, self.block_size, q.group, q.residual)
        return peak_blocks(seq, self.num_layers, self.num_kv_heads, self.block_size)

    def stored_tokens(self, seq_id: int) -> int:
        return sum(kv.num_tokens for kv in self.kv.get(seq_id, []) if kv is not None)

    @property
    def block_nbytes(self) -> int:
        return self.pool.block_nbytes

    def blocks_in_use(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    # ------------------------------------------------------------------ membership
    def layer(self, seq_id: int, layer_idx: int) -> PagedKV | None:
        layers = self.kv.get(seq_id)
        return None if layers is None else layers[layer_idx]

    def join(
        self, seq_id: int, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> PagedKV:
        """The sequence's first chunk in this layer: keys/values [kv_heads, t, d] at positions [t]."""
        layers = self.kv.setdefault(seq_id, [None] * self.num_layers)
        if layers[layer_idx] is not None:
            raise RuntimeError(f"sequence {seq_id} already holds KV in layer {layer_idx}")
        if self.quant is not None:
            kv: PagedKV | PagedQuantizedKV = PagedQuantizedKV(self.pool, self.quant.residual)  # type: ignore[arg-type]
        else:
            kv = PagedKV(self.pool)  # type: ignore[arg-type]
        layers[layer_idx] = kv
        kv.join(keys, values, positions=positions)
        return kv

    def fork_prefix(self, seq_id: int, layers: list[PagedKV]) -> None:
        """The sequence starts on a cached prefix: its layers share the prefix's blocks
        and own copies of their partly filled last blocks (blocks_for_fork counts them)."""
        if seq_id in self.kv:
            raise RuntimeError(f"sequence {seq_id} already holds KV")
        forks = self.kv[seq_id] = [kv.fork() for kv in layers]
        for kv in forks:
            kv.unshare_tails()

    def cache_prefix(self, seq_id: int, key: PrefixKey) -> bool:
        """Keep the sequence's just-compressed prefix for reuse, if the pool has room for
        the copies of the partly filled last blocks the sequence goes on writing into."""
        layers = self.kv[seq_id]
        tails = sum(1 for kv in layers for n in kv.lengths.tolist() if n % self.block_size)
        if tails > self.num_free_blocks:
            self.prefixes.cancel(seq_id)
            return False
        self.prefixes.put(key, layers)
        for kv in layers:
            kv.unshare_tails()
        return True

    def free(self, seq_id: int) -> None:
        """Return every block of the sequence to the pool (finished, aborted or preempted);
        blocks a cached prefix also holds stay with it."""
        for kv in self.kv.pop(seq_id, []):
            if kv is not None and kv.num_heads:
                kv.leave(slice(0, kv.num_heads))
        self.prefixes.cancel(seq_id)
        for listener in self.on_free:
            listener(seq_id)

    def is_whole(self) -> bool:
        """No sequence and no cached prefix holds blocks, and every block is free: nothing leaked."""
        return not self.kv and not self.prefixes and self.pool.num_free == self.pool.num_blocks
