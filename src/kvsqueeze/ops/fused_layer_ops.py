"""A Llama layer's elementwise steps (RMSNorm, SwiGLU's silu(gate) * up, RoPE), each
one C++ pass over bf16 or fp32 CPU tensors (csrc/layer_ops.cpp), torch operations otherwise.

In bf16 on the CPU, torch runs each of these as several operations that convert,
compute, round and write the whole tensor: on a 2048-token chunk RMSNorm took 4 ms.
In fp32 at a decode step's few rows the operations are cheap but many (about a dozen a
layer): the kernels take a `full` step at batch 16 x 2k from 135 to 124 ms (median,
in-process A/B, 2-core Zen 3).
The kernels round to bf16 where torch's operations do, so both paths agree (in fp32,
to the last bit or two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.ops.cpu_extension import cpu_extension


def _fused(x: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether the kernels take x (and the others, which must share its dtype)."""
    return (
        x.dtype in (torch.bfloat16, torch.float32)
        and x.device.type == "cpu"
        and all(t.dtype == x.dtype and t.device.type == "cpu" for t in others)
        and cpu_extension() is not None
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalize in fp32, scale in the input's dtype."""
    if _fused(x, weight):
        return cpu_extension().rms_norm(x.contiguous(), weight.contiguous(), eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused gate/up projection [..., 2I] (gate first) -> [..., I]."""
    if _fused(gate_up):
        return cpu_extension().silu_mul(gate_up.contiguous())
    gate, up = gate_up.chunk(2, -1)
    return F.silu(gate) * up


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, d] by cos/sin [T, 1, d/2] (rotate-half convention, as transformers' Llama)."""
    if _fused(x, cos, sin):
        return cpu_extension().rope(x.contiguous(), cos.contiguous(), sin.contiguous())
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
