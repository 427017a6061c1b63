"""ops/skinny_linear.py: a few fp32 rows by an fp32 or bf16 weight give F.linear's
products (to fp32 rounding), every row the same whatever rows share its call, and
the kernel declines what it does not take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.ops.skinny_linear import OUTER_MIN_ROWS, SKINNY_MAX_ROWS, _extension, skinny_linear, skinny_linear_takes

needs_kernel = pytest.mark.skipif(_extension() is None, reason="the skinny kernel needs AVX2/FMA and a compiler")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 23, SKINNY_MAX_ROWS])
@pytest.mark.parametrize("out_features", [1, 13, 14, 27, 41, 64])  # every tail of 6-row blocks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_equal_f_linear(rows, out_features, dtype):
    gen = torch.Generator().manual_seed(rows * out_features)
    w = torch.randn(out_features, 200, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype)
    x = torch.randn(rows, 200, generator=gen)
    assert skinny_linear_takes(x, w)
    torch.testing.assert_close(skinny_linear(x, w, b), F.linear(x, w.float(), b.float()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(skinny_linear(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_bits_alone_or_among_others(dtype):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 96, generator=gen).to(dtype)
    x = torch.randn(SKINNY_MAX_ROWS, 96, generator=gen)
    # Each of the kernel's two forms (below and from OUTER_MIN_ROWS rows) gives a row
    # the same bits whatever rows share its call; across forms they round differently.
    few = skinny_linear(x[: OUTER_MIN_ROWS - 1], w)
    for i in range(OUTER_MIN_ROWS - 1):
        assert torch.equal(skinny_linear(x[i : i + 1], w)[0], few[i])
    many = skinny_linear(x, w)
    for rows in (8, 9, 16, 17, 40):  # one 8-row vector, across vectors and 16-row panels
        assert torch.equal(skinny_linear(x[:rows], w), many[:rows])
        assert torch.equal(skinny_linear(x[rows - 8 : rows], w), many[rows - 8 : rows])
    torch.testing.assert_close(few, many[: OUTER_MIN_ROWS - 1], rtol=1e-5, atol=1e-5)


@needs_kernel
def test_leading_dimensions_are_kept():
    x, w = torch.randn(2, 3, 16), torch.randn(5, 16)
    out = skinny_linear(x, w)
    assert out.shape == (2, 3, 5)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_declines_what_it_does_not_take():
    w = torch.randn(8, 16)
    assert not skinny_linear_takes(torch.randn(2, 12), torch.randn(8, 12))  # K not a multiple of 8
    assert not skinny_linear_takes(torch.randn(SKINNY_MAX_ROWS + 1, 16), w)  # too many rows
    assert not skinny_linear_takes(torch.randn(2, 16).bfloat16(), w)  # rows not fp32
    assert not skinny_linear_takes(torch.randn(2, 16), w.half())  # an fp16 weight


@needs_kernel
def test_a_bias_of_the_wrong_size_is_refused():
    with pytest.raises(RuntimeError, match="bias"):
        skinny_linear(torch.randn(2, 16), torch.randn(8, 16), torch.randn(1))
