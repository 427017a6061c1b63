"""Linear: y = x W^T + b, with a prepacked copy of W for decode-sized batches on the CPU.

A decode step multiplies a few rows by every weight, so it is bound by reading the
weights. F.linear hands oneDNN the plain [out, in] layout at every call; on a CPU with
bf16 matrix instructions a copy packed once ahead of time is faster:
- with AMX, ops/amx_linear.py's kernel, up to 256 rows: SmolLM2's linear layers of a
  step take 17 ms at 16 rows against 35 with oneDNN's packed layout and 23 ms at 32
  rows against 51 (2-core Sapphire Rapids); at 256 rows 143 ms against F.linear's 183;
- otherwise (or for shapes the kernel does not take) oneDNN's own blocked layout,
  1.3-1.8x faster than the plain one up to 128 rows.
Past that F.linear is faster (at a 2048-token prefill chunk, 1.5x the AMX kernel and
7% more than oneDNN's packed layout). The price is a second copy of the decoder's
weights in host memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.ops.amx_linear import amx_linear, amx_linear_available, amx_packable, pack_amx_weight

PACKED_MAX_ROWS = 128  # up to this many rows, oneDNN's packed copy beats F.linear
AMX_MAX_ROWS = 256  # up to this many rows, the AMX kernel beats F.linear


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether packed bf16 products are available and run on matrix instructions here."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


class Linear:
    """A weight [out, in] and optional bias [out]; `prepack` adds a packed copy (AMX
    tiles where the kernel runs and takes the shape, oneDNN's layout otherwise)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = False) -> None:
        self.weight, self.bias = weight, bias
        self.amx = prepack and amx_packable(weight) and amx_linear_available()
        if self.amx:
            self.packed = pack_amx_weight(weight)
            self.amx_bias = None if bias is None else bias.float().contiguous()
        elif prepack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_MAX_ROWS)
        else:
            self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None or x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        if self.amx and x.shape[0] <= AMX_MAX_ROWS:
            return amx_linear(x, self.packed, self.amx_bias)
        if not self.amx and x.shape[0] <= PACKED_MAX_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
