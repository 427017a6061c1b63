"""engine/linear.py: the prepacked copy (AMX tiles or oneDNN's layout) gives F.linear's
products for decode-sized batches, and large batches keep F.linear; a widened weight
multiplies bf16 rows in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvsqueeze.engine.linear import AMX_MAX_ROWS, PACKED_MAX_ROWS, Linear, can_prepack, widens_bf16
from kvsqueeze.ops.skinny_linear import SKINNY_MAX_ROWS, skinny_linear_takes

needs_packing = pytest.mark.skipif(
    not can_prepack(torch.bfloat16, torch.device("cpu")), reason="no bf16 matrix instructions on this CPU"
)


@needs_packing
@pytest.mark.parametrize("rows", [1, 7, 32, PACKED_MAX_ROWS, PACKED_MAX_ROWS + 1, AMX_MAX_ROWS + 1, 600])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_products_equal_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(320, 96, generator=gen).bfloat16()
    b = torch.randn(320, generator=gen).bfloat16() if bias else None
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    layer = Linear(w, b, prepack=True)
    assert layer.packed is not None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 320)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=5e-2)


def test_no_packing_off_bf16_or_off_the_cpu():
    assert not can_prepack(torch.float32, torch.device("cpu"))
    assert not can_prepack(torch.bfloat16, torch.device("meta"))
    w = torch.randn(8, 4)  # K = 4: not a shape the skinny kernel takes
    layer = Linear(w, prepack=False)
    x = torch.randn(3, 4)
    assert layer.packed is None and torch.equal(layer(x), F.linear(x, w))


@needs_packing
def test_amx_tiles_where_the_kernel_takes_the_shape_onednn_elsewhere():
    from kvsqueeze.ops.amx_linear import amx_linear_available

    tiled = Linear(torch.randn(64, 96).bfloat16(), prepack=True)
    odd = Linear(torch.randn(64, 40).bfloat16(), prepack=True)  # 40 columns: not whole AMX tiles
    assert tiled.amx == amx_linear_available() and not odd.amx
    x = torch.randn(3, 40).bfloat16()
    torch.testing.assert_close(odd(x).float(), F.linear(x.float(), odd.weight.float()), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("bias", [False, True])
def test_a_widened_weight_multiplies_bf16_rows_in_fp32_and_answers_in_bf16(bias):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 64, generator=gen).bfloat16()
    b = torch.randn(48, generator=gen).bfloat16() if bias else None
    x = torch.randn(5, 64, generator=gen).bfloat16()
    layer = Linear(w, b, widen=True)
    out = layer(x)
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert layer.weight is w and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)  # bf16's rounding of the answer
    wide = layer(torch.randn(SKINNY_MAX_ROWS + 1, 64, generator=gen).bfloat16())  # past the kernel: an fp32 copy
    assert wide.dtype == torch.bfloat16 and wide.shape == (SKINNY_MAX_ROWS + 1, 48)


def test_bf16_is_widened_exactly_where_it_is_not_prepacked():
    cpu = torch.device("cpu")
    if torch.backends.mkldnn.is_available():
        assert widens_bf16(torch.bfloat16, cpu) != can_prepack(torch.bfloat16, cpu)
    assert not widens_bf16(torch.float32, cpu) and not widens_bf16(torch.bfloat16, torch.device("meta"))
    with pytest.raises(ValueError, match="either prepacked"):
        Linear(torch.randn(16, 32).bfloat16(), prepack=True, widen=True)


@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (SKINNY_MAX_ROWS, 64), (SKINNY_MAX_ROWS + 1, 64), (2, 5, 64)])
def test_fp32_rows_take_the_kernel_chosen_at_load_and_give_f_linear_products(shape):
    gen = torch.Generator().manual_seed(shape[0])
    w, b = torch.randn(40, 64, generator=gen), torch.randn(40, generator=gen)
    layer = Linear(w, b)
    assert (layer.skinny is not None) == skinny_linear_takes(torch.randn(1, 64), w)
    x = torch.randn(*shape, generator=gen)
    out = layer(x)  # past SKINNY_MAX_ROWS rows, or not 2-D: fp32_linear
    assert out.shape == (*shape[:-1], 40)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_the_kernel_is_asked_for_only_where_rows_come_in_fp32():
    assert Linear(torch.randn(40, 64).bfloat16()).skinny is None  # a bf16 layer kept in bf16
