"""Linear: y = x W^T + b, with a prepacked copy of W for decode-sized batches on the CPU.

On a CPU with bf16 matrix instructions (AMX, AVX512-BF16) oneDNN runs a bf16 product
fastest on a weight it has laid out in its own blocked format. F.linear hands it the
plain [out, in] layout at every call; a copy packed once ahead of time makes a decode
step's products (1 to 128 rows) 1.3-1.8x faster on SmolLM2's shapes, while at a
2048-token prefill chunk the plain layout is 7% faster (2-core Xeon with AMX). So small
batches take the packed copy and large ones F.linear: the price is a second copy of
the decoder's weights in host memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_MAX_ROWS = 128  # up to this many rows, the packed copy is faster


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether packed bf16 products are available and run on matrix instructions here."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


class Linear:
    """A weight [out, in] and optional bias [out]; `prepack` adds oneDNN's packed copy."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = False) -> None:
        self.weight, self.bias = weight, bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_MAX_ROWS) if prepack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and x.shape[0] <= PACKED_MAX_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
