"""The fused CPU quantizer (ops/cpu_quantize.py) gives the torch quantizer's codes,
scales and zero points bit for bit, so stores built either way are the same."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.ops.cpu_quantize import CpuKVQuantizer, quantize_extension
from kvsqueeze.store.quantize import KVQuantizer

pytestmark = pytest.mark.skipif(quantize_extension() is None, reason="the fused quantizer cannot be built here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [8, 32, 256])
def test_fused_quantizer_equals_the_torch_quantizer_bit_for_bit(dtype, bits, group):
    gen = torch.Generator().manual_seed(bits * group)
    for scale in (0.01, 1.0, 300.0):
        keys = (torch.randn(2, 7, group, 64, generator=gen) * scale).to(dtype)
        keys[0, 0, :, 3] = 2.5  # a constant channel: no range, scale 1
        values = (torch.randn(3, 40, 64, generator=gen) * scale).to(dtype)
        values[0, 0] = -1.0  # a constant row
        torch_q, fused = KVQuantizer(bits, group), CpuKVQuantizer(bits, group)
        for want, got in zip(torch_q.quantize_key_groups(keys), fused.quantize_key_groups(keys), strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert torch.equal(fused.quantize_rows(values), torch_q.quantize_rows(values))


def test_values_past_the_fp16_range_are_refused_as_by_the_torch_quantizer():
    with pytest.raises(ValueError, match="fp16 range"):
        CpuKVQuantizer(4, 32).quantize_rows(torch.full((2, 64), 1e5))
    with pytest.raises(ValueError, match="fp16 range"):
        CpuKVQuantizer(4, 8).quantize_key_groups(torch.full((1, 8, 64), -1e5))
