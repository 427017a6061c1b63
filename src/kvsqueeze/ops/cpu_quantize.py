"""KIVI's quantizer fused into one C++ pass over the K/V, for CPU tensors
(csrc/quantize.cpp, arXiv 2402.02750).

store/quantize.py's KVQuantizer quantizes with a chain of torch ops (min, max, scale,
round, clamp, pack), each a pass over the K/V: quantizing a whole 2k-token prefill
cost about 7% of the prefill (docs/results/kv_quantization). CpuKVQuantizer is the
same quantizer with its two quantizing methods in one pass; the codes, scales and
zeros are the torch path's bit for bit (the file is built with IEEE arithmetic). The
store layer cannot import ops/, so the layers that build stores (hf/cache.py, the
engine's block manager) hand it in; CUDA tensors, or a machine without the kernel,
take the torch path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from kvsqueeze.ops.cpu_extension import EXACT_CFLAGS, build_extension
from kvsqueeze.store.quantize import KVQuantizer


@functools.cache
def quantize_extension() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or KVSQUEEZE_CPU_KERNEL=0."""
    return build_extension("kvsqueeze_cpu_quantize", ["quantize.cpp"], "kvsqueeze's fused quantizer", EXACT_CFLAGS)


@dataclass(frozen=True)
class CpuKVQuantizer(KVQuantizer):
    """KVQuantizer whose quantize_key_groups and quantize_rows run fused on the CPU."""

    def quantize_key_groups(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ext = quantize_extension()
        if ext is None or keys.device.type != "cpu":
            return super().quantize_key_groups(keys)
        self.code_bytes(keys.shape[-1])
        g, d = keys.shape[-2:]
        codes, scale, zero = ext.quantize_key_groups(keys.reshape(-1, g, d), self.bits)
        lead = keys.shape[:-2]
        return codes.view(*lead, g, -1), scale.view(*lead, d), zero.view(*lead, d)

    def quantize_rows(self, x: torch.Tensor) -> torch.Tensor:
        ext = quantize_extension()
        if ext is None or x.device.type != "cpu":
            return super().quantize_rows(x)
        d = x.shape[-1]
        rows = ext.quantize_rows(x.reshape(-1, d), self.bits, self.channel_group(d))
        return rows.view(*x.shape[:-1], -1)
