"""Decode attention over KIVI-quantized K/V (arXiv 2402.02750) on the CPU, from a
small C++ kernel (csrc/quantized_decode.cpp), for the engine's pages and the HF
path's flat store.

The torch paths (paged_quantized_attention.py, quantized_attention.py) dequantize a
block of entries at a time into fp32 tiles: several passes over tensors many times
the size of the codes. The kernel reads each row's codes in place and folds a key
group's scale and zero point into the queries, so a key costs an unpack and a dot.
It is built like the other CPU kernels (cpu_extension.py: -march=native, cached per
CPU model), as its own module; where it cannot be built the torch paths run.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from types import ModuleType

import torch

from kvsqueeze.ops.cpu_extension import build_extension
from kvsqueeze.store.flat_kv import FlatKV
from kvsqueeze.store.paged_quantized_kv import PagedQuantizedKV
from kvsqueeze.store.quantized_kv import QuantizedKV

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def quantized_extension() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or KVSQUEEZE_CPU_KERNEL=0."""
    return build_extension("kvsqueeze_cpu_quant", ["quantized_decode.cpp"], "kvsqueeze's quantized decode kernel")


def quantized_kernel_available() -> bool:
    return quantized_extension() is not None


def _require() -> ModuleType:
    """The compiled module, for callers that have already chosen the kernel path."""
    ext = quantized_extension()
    if ext is None:
        raise RuntimeError("kvsqueeze's quantized decode kernel is not available")
    return ext


def quantized_decode_cpu(
    query: torch.Tensor,
    stores: Sequence[PagedQuantizedKV],
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    masked: bool = True,
) -> torch.Tensor:
    """paged_quantized_attention's contract for one query token per row: query [rows,
    group, 1, d] (the stores' kv-heads stacked), query_positions [rows, 1]; returns
    [rows, group, 1, d] in the query's dtype. masked=False promises every entry is older
    than its query and inside any window (a plain decode step)."""
    ext = _require()
    pool = stores[0].pool
    o = pool.layout(pool.head_dim, pool.quantizer, pool.dtype)
    layout = [
        pool.group, pool.block_size, pool.quantizer.bits, pool.quantizer.channel_group(pool.head_dim),
        pool.page_nbytes, o["q_values"], o["q_positions"], o["q_scale"], o["fp_values"], o["fp_positions"],
        _DTYPES[pool.dtype],
    ]  # fmt: skip

    def each(table: str) -> list[torch.Tensor]:  # every store's own tensor, read in place by the kernel
        return [getattr(kv, table).to(torch.int64).contiguous() for kv in stores]

    out = ext.quantized_paged_decode(
        query[:, :, 0].float().contiguous(), pool.arena, each("q_table"), each("q_counts"), each("fp_table"),
        each("fp_offsets"), each("fp_lengths"), query_positions[:, 0].to(torch.int64).contiguous(), layout,
        float(scaling), sliding_window or 0, masked,
    )  # fmt: skip
    return out[:, :, None].to(query.dtype)


def quantized_flat_decode_cpu(
    query: torch.Tensor,
    kv: QuantizedKV,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    masked: bool = True,
) -> torch.Tensor:
    """quantized_attention's contract for one query token per head over a QuantizedKV
    with per-channel keys: query [heads, group, 1, d], query_positions [heads, 1];
    returns [heads, group, 1, d] in the query's dtype. masked=False promises every
    entry is older than its query and inside any window (a plain decode step)."""
    ext = _require()
    codes, groups, residual = kv.codes, kv.groups, kv.residual
    d = kv.head_dim

    def runs(store: FlatKV) -> list[torch.Tensor]:
        return [store.starts.to(torch.int64).contiguous(), store.lengths.to(torch.int64).contiguous()]

    out = ext.quantized_flat_decode(
        query[:, :, 0].float().contiguous(),
        codes.keys.contiguous(), codes.values.contiguous(), codes.positions.contiguous(), *runs(codes),
        groups.keys.contiguous(), groups.values.contiguous(), groups.positions.contiguous(), *runs(groups),
        residual.keys.contiguous(), residual.values.contiguous(), residual.positions.contiguous(), *runs(residual),
        query_positions[:, 0].to(torch.int64).contiguous(), kv.quantizer.bits, kv.quantizer.channel_group(d),
        float(scaling), sliding_window or 0, masked,
    )  # fmt: skip
    return out[:, :, None].to(query.dtype)
