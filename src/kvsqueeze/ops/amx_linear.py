"""x W^T + b for a decode step's few bf16 rows on AMX tiles (csrc/amx_linear.cpp).

At 16 to 32 rows oneDNN reads SmolLM2's weights at 5-8 GB/s, half of what a 2-core
Sapphire Rapids streams, and a decode step's linear layers cost more than its
attention. The kernel multiplies a weight packed once by `pack_amx_weight` and
prefetches it along K, reading at 12-19 GB/s on the same shapes.
"""

from __future__ import annotations

import functools

import torch

from kvsqueeze.ops.cpu_extension import cpu_extension, require_cpu_extension

TILE_ROWS, TILE_K = 16, 32  # an AMX bf16 tile: 16 rows of 32 values


@functools.cache
def amx_linear_available() -> bool:
    """Whether the kernels are built with AMX-BF16 and the OS grants this process its tiles."""
    ext = cpu_extension()
    return ext is not None and ext.amx_linear_available()


def amx_packable(weight: torch.Tensor) -> bool:
    """Whether a weight [out, in] has the shape and dtype the kernel takes."""
    out_features, in_features = weight.shape
    return weight.dtype == torch.bfloat16 and out_features % TILE_ROWS == 0 and in_features % TILE_K == 0


def pack_amx_weight(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] as [N/16, K/32, 16, 32]: for each 16-column block, K's tiles in order,
    each tile's row r holding the pairs (k = 2r, 2r + 1) of its 16 columns side by side,
    the layout tdpbf16ps multiplies."""
    if not amx_packable(weight):
        raise ValueError(
            f"pack_amx_weight: needs a bf16 weight [out, in] with out % 16 == 0 and in % 32 == 0, "
            f"got {tuple(weight.shape)} {weight.dtype}"
        )
    n, k = weight.shape
    tiles = weight.reshape(n // TILE_ROWS, TILE_ROWS, k // TILE_K, TILE_ROWS, 2)
    return tiles.permute(0, 2, 3, 1, 4).contiguous().view(n // TILE_ROWS, k // TILE_K, TILE_ROWS, TILE_K)


def amx_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16 times the packed weight, plus bias (fp32 [N]): [M, N] bf16."""
    return require_cpu_extension().amx_linear(x.contiguous(), packed, bias)
