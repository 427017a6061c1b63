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

A CPU without bf16 instructions (AVX2 only, e.g. Zen 3) has oneDNN emulate bf16
products, 4-9x slower than fp32 ones (2-core Zen 3: a 2048-row [3072, 576] product
takes 455 ms in bf16, 70 in fp32; 32 rows 7.4 ms against 1.6). There a bf16 layer is
`widened`: its rows are multiplied in fp32, by the weight itself (ops/skinny_linear.py,
widening in registers) up to SKINNY_MAX_ROWS rows, by an fp32 copy made per call past
that. fp32 rows up to SKINNY_MAX_ROWS take the same kernel: sgemm reads the weights at
3-5 GB/s there. (By default the engine computes in fp32 altogether on such a CPU, fp32
weights: ModelRunner's compute dtype. Widened layers serve a runner kept in bf16.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.ops.amx_linear import amx_linear, amx_linear_available, amx_packable, pack_amx_weight
from kvsqueeze.ops.skinny_linear import SKINNY_MAX_ROWS, fp32_linear, native_bf16_products, skinny_kernel

PACKED_MAX_ROWS = 128  # up to this many rows, oneDNN's packed copy beats F.linear
AMX_MAX_ROWS = 256  # up to this many rows, the AMX kernel beats F.linear


def can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether packed bf16 products are available and run on matrix instructions here."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    return native_bf16_products()


def widens_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether bf16 products on `device` run faster in fp32 (a CPU without bf16 instructions)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16_products()


class Linear:
    """A weight [out, in] and optional bias [out]; `prepack` adds a packed copy (AMX
    tiles where the kernel runs and takes the shape, oneDNN's layout otherwise);
    `widen` multiplies rows of another dtype in fp32 (returned in their dtype)."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, prepack: bool = False, widen: bool = False
    ) -> None:
        if prepack and widen:
            raise ValueError("Linear: a weight is either prepacked in bf16 or widened to fp32, not both")
        self.widened = widen
        self.weight, self.bias = weight, bias
        self.amx = prepack and amx_packable(weight) and amx_linear_available()
        if self.amx:
            self.packed = pack_amx_weight(weight)
            self.amx_bias = None if bias is None else bias.float().contiguous()
        elif prepack:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_MAX_ROWS)
        else:
            self.packed = None
        # Asked only where rows come in fp32 (an fp32 or widened layer): the kernel builds on first use.
        self.skinny = skinny_kernel(weight) if widen or weight.dtype == torch.float32 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.widened:
            return self._fp32(x.float()).to(x.dtype)
        if x.dtype == torch.float32:
            return self._fp32(x)
        if self.packed is None or x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        if self.amx and x.shape[0] <= AMX_MAX_ROWS:
            return amx_linear(x, self.packed, self.amx_bias)
        if not self.amx and x.shape[0] <= PACKED_MAX_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _fp32(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 rows: straight to the skinny kernel for a decode step's few rows (its
        checks made once, at load), else fp32_linear."""
        if self.skinny is not None and x.dim() == 2 and x.shape[0] <= SKINNY_MAX_ROWS and x.device.type == "cpu":
            return self.skinny(x, self.weight, self.bias)
        return fp32_linear(x, self.weight, self.bias)
