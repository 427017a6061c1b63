"""The bf16 C++ layer ops (csrc/layer_ops.cpp) against the torch operations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.ops.cpu_extension import cpu_kernels_available
from kvsqueeze.ops.fused_layer_ops import apply_rope, rms_norm, silu_mul

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="the C++ kernels cannot be built here")


def close_in_bf16(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal but for rare flips of the last bit (fp32 sum order; a flip before the last rounding can carry)."""
    assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=2**-6)
    assert (a == b).float().mean() > 0.99


def test_rms_norm_matches_transformers_rounding():
    x = (torch.randn(300, 576) * 4).bfloat16()
    w = torch.randn(576).bfloat16()
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    close_in_bf16(rms_norm(x, w, 1e-5), expected)


def test_silu_mul_matches_torch():
    gate_up = (torch.randn(2, 37, 2 * 96) * 3).bfloat16()
    gate, up = gate_up.chunk(2, -1)
    close_in_bf16(silu_mul(gate_up), F.silu(gate) * up)


def test_rope_matches_torch_and_takes_views():
    qkv = torch.randn(50, 12, 64).bfloat16()
    angles = torch.rand(50, 1, 32) * 6
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    x = qkv[:, :9]  # a view, as the model passes q and k out of the fused projection
    x1, x2 = x.chunk(2, dim=-1)
    close_in_bf16(apply_rope(x, cos, sin), torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def test_fp32_takes_the_torch_path_unchanged():
    x, w = torch.randn(4, 8), torch.randn(8)
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(rms_norm(x, w, 1e-6), expected)
