"""ops/amx_linear.py: the AMX kernel gives F.linear's products (to bf16 rounding) for
any number of rows, tile-aligned or not, with and without bias, and refuses what it
cannot multiply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.ops.amx_linear import amx_linear, amx_linear_available, amx_packable, pack_amx_weight

needs_amx = pytest.mark.skipif(not amx_linear_available(), reason="no AMX-BF16 on this CPU (or the OS refuses it)")


def test_packing_puts_each_column_pair_where_tdpbf16ps_reads_it():
    w = (torch.arange(32 * 64) % 251).reshape(32, 64).to(torch.bfloat16)
    packed = pack_amx_weight(w)
    assert packed.shape == (2, 2, 16, 32)
    for block, tile, row, col in [(0, 0, 0, 0), (1, 1, 15, 31), (0, 1, 3, 6), (1, 0, 7, 9)]:
        n = block * 16 + col // 2
        k = tile * 32 + 2 * row + col % 2
        assert packed[block, tile, row, col] == w[n, k]


@pytest.mark.parametrize("shape", [(8, 64), (16, 48), (17, 64), (32, 31)])
def test_packing_refuses_shapes_and_dtypes_the_tiles_do_not_fit(shape):
    w = torch.randn(*shape).bfloat16()
    assert not amx_packable(w)
    with pytest.raises(ValueError, match="out % 16 == 0 and in % 32 == 0"):
        pack_amx_weight(w)
    assert not amx_packable(torch.randn(32, 64))  # fp32


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 64, 100, 256])
@pytest.mark.parametrize("out_features", [16, 48, 96])
@pytest.mark.parametrize("bias", [False, True])
def test_products_equal_f_linear(rows, out_features, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, 96, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    out = amx_linear(x, pack_amx_weight(w), b)
    expected = F.linear(x.float(), w.float(), b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    # fp32 sums of exact bf16 products, rounded once to bf16: within half a bf16 step
    # (at most 2^-8 relative) plus fp32 summation-order noise
    assert ((out.float() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()


@needs_amx
def test_rows_do_not_mix():
    """A row's product depends on that row only, whatever else shares its tile."""
    gen = torch.Generator().manual_seed(7)
    w = pack_amx_weight(torch.randn(64, 64, generator=gen).bfloat16())
    x = torch.randn(20, 64, generator=gen).bfloat16()
    alone = torch.cat([amx_linear(x[i : i + 1], w) for i in range(20)])
    assert torch.equal(amx_linear(x, w), alone)


@needs_amx
def test_bad_input_is_refused_with_a_message():
    w = pack_amx_weight(torch.randn(32, 64).bfloat16())
    with pytest.raises(RuntimeError, match="x has 32 columns, the weight 64"):
        amx_linear(torch.randn(4, 32).bfloat16(), w)
    with pytest.raises(RuntimeError, match="x must be contiguous bf16"):
        amx_linear(torch.randn(4, 64), w)
    with pytest.raises(RuntimeError, match="bias must be contiguous fp32"):
        amx_linear(torch.randn(4, 64).bfloat16(), w, torch.randn(32).bfloat16())
    assert amx_linear(torch.randn(4, 64).bfloat16(), w).shape == (4, 32)  # still works after the refusals
