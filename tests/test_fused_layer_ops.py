"""The C++ layer ops (csrc/layer_ops.cpp), bf16 and fp32, against the torch operations they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.ops.cpu_extension import cpu_extension, cpu_kernels_available
from kvsqueeze.ops.fused_layer_ops import apply_rope, rms_norm, silu_mul

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="the C++ kernels cannot be built here")
DTYPES = [torch.bfloat16, torch.float32]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """bf16: equal but for rare flips of the last bit (fp32 sum order; a flip before the
    last rounding can carry). fp32: equal to a few ulps (sum order, exp, fused multiply-adds)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == torch.bfloat16:
        torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=2**-6)
        assert (a == b).float().mean() > 0.99
    else:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_transformers_rounding(dtype):
    x = (torch.randn(300, 576) * 4).to(dtype)
    w = torch.randn(576).to(dtype)
    xf = x.float()
    expected = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    close(rms_norm(x, w, 1e-5), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype):
    gate_up = (torch.randn(2, 37, 2 * 96) * 3).to(dtype)
    gate, up = gate_up.chunk(2, -1)
    close(silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_torch_and_takes_views(dtype):
    qkv = torch.randn(50, 12, 64).to(dtype)
    angles = torch.rand(50, 1, 32) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    x = qkv[:, :9]  # a view, as the model passes q and k out of the fused projection
    x1, x2 = x.chunk(2, dim=-1)
    close(apply_rope(x, cos, sin), torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))


def test_mixed_dtypes_take_the_torch_path_unchanged():
    x, w = torch.randn(4, 8), torch.randn(8).bfloat16()
    expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert torch.equal(rms_norm(x, w, 1e-6), expected)


def test_the_kernels_refuse_other_dtypes_by_name():
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        cpu_extension().silu_mul(torch.randn(3, 8).half())
    with pytest.raises(RuntimeError, match="weight must be a contiguous CPU tensor of x's dtype"):
        cpu_extension().rms_norm(torch.randn(3, 8), torch.randn(8).bfloat16(), 1e-6)
