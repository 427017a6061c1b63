"""x W^T + b for a few fp32 rows (csrc/skinny_linear.cpp): decode steps and short
teacher-forced answers, whose products read every weight once for a few rows.

On a 2-core Zen 3, MKL's sgemm reads SmolLM2's weights at 3-5 GB/s at 1 to 64 rows;
the kernel streams them at the memory's pace up to 8 rows and runs at the FMA peak
from 16 (SmolLM2's products for 16 rows take 27 ms against sgemm's 99), from fp32 or
bf16 weights (widened in registers, so a bf16 model reads half the bytes)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F

from kvsqueeze.ops.cpu_extension import build_extension

SKINNY_MAX_ROWS = 64  # the kernel beats sgemm up to here, not at 128 (benchmarks/skinny_linear.py)
OUTER_MIN_ROWS = 8  # csrc/skinny_linear.cpp's: from here its outer-product form (other rounding)


@functools.cache
def _extension() -> ModuleType | None:
    ext = build_extension("kvsqueeze_cpu_skinny", ["skinny_linear.cpp"], "kvsqueeze's skinny linear kernel")
    return ext if ext is not None and ext.skinny_linear_available() else None


def skinny_kernel(weight: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The kernel's entry point, ext(x [M, K] fp32, weight, bias | None) -> [M, N] fp32
    for at most SKINNY_MAX_ROWS CPU rows, where it takes this weight (a CPU fp32 or bf16
    [N, K], K a multiple of 8, a build with AVX2); else None. A decode step's layers ask
    once, at load: the checks per call cost about as much as a small product."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or weight.shape[-1] % 8:
        return None
    ext = _extension()
    return None if ext is None else ext.skinny_linear


def skinny_linear_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel runs these rows by this weight: fp32 rows on the CPU, at most
    SKINNY_MAX_ROWS of them, and a weight skinny_kernel takes."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() <= SKINNY_MAX_ROWS * x.shape[-1]
        and skinny_kernel(weight) is not None
    )


@functools.cache  # asked on every bf16 product of a transformers model (hf/skinny_linears.py)
def native_bf16_products() -> bool:
    """Whether this CPU multiplies bf16 with its own instructions (AMX or AVX512-BF16);
    elsewhere oneDNN emulates them, 4-9x slower than fp32 products (2-core Zen 3)."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 rows x by a weight (and bias) of any float dtype, in fp32: the kernel where it
    takes them, else F.linear over fp32 copies (none made for fp32 tensors)."""
    if skinny_linear_takes(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight.float(), None if bias is None else bias.float())


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] fp32 times weight [N, K] (fp32 or bf16), plus bias: [..., N] fp32."""
    ext = _extension()
    if ext is None:
        raise RuntimeError("kvsqueeze's skinny linear kernel is not available")
    return ext.skinny_linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
