"""store/quantize.py: exact bit layout of packed codes, and round-trip error bounds."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.store.quantize import KVQuantizer, pack, quantize_along, unpack


def test_int4_packs_two_codes_per_byte_in_planes():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    packed = pack(codes, 4)
    # Byte j: channel j in the low nibble, channel j + 3 in the high one.
    assert packed.tolist() == [[1 | 0 << 4, 2 | 7 << 4, 15 | 8 << 4]]
    assert torch.equal(unpack(packed, 4), codes)


def test_int2_packs_four_codes_per_byte():
    codes = torch.tensor([3, 0, 1, 2, 2, 2, 0, 1], dtype=torch.uint8)
    packed = pack(codes, 2)
    # Byte j: channels j, j + 2, j + 4, j + 6 from the low bits up.
    assert packed.tolist() == [3 | 1 << 2 | 2 << 4 | 0 << 6, 0 | 2 << 2 | 2 << 4 | 1 << 6]
    assert torch.equal(unpack(packed, 2), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_round_trips_every_code(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_bad_bits_and_ragged_bytes_are_refused():
    with pytest.raises(ValueError, match="kv bits"):
        pack(torch.zeros(4, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="whole bytes"):
        pack(torch.zeros(3, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="kv bits"):
        KVQuantizer(bits=16)
    with pytest.raises(ValueError, match="multiple of the channel group"):
        KVQuantizer(group=24).quantize_rows(torch.zeros(2, 64))


def max_error_bound(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Half a quantization step of each slice, plus fp16 rounding of its ends."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    step = (hi - lo) / ((1 << bits) - 1)
    return step / 2 + 2**-10 * (hi.abs() + lo.abs()) + 1e-6


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_key_groups_round_trip_within_half_a_step_per_channel(bits):
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(6, 32, 64, generator=gen)
    keys[..., 5] *= 20  # an outlier channel: only its own scale grows
    q = KVQuantizer(bits=bits, group=32)
    codes, scale, zero = q.quantize_key_groups(keys)
    assert codes.shape == (6, 32, 64 * bits // 8) and scale.shape == zero.shape == (6, 64)
    assert scale.dtype == zero.dtype == torch.float16
    back = q.dequantize_keys(codes, scale[:, None], zero[:, None])
    error = (back - keys).abs()
    assert bool((error <= max_error_bound(keys, bits, dim=-2)).all())
    # The outlier channel does not spoil the others (per-channel scales).
    assert float(error[..., 6].max()) < float(error[..., 5].max()) / 5


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_value_rows_round_trip_within_half_a_step_per_channel_group(bits):
    values = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(1)) * 3
    q = KVQuantizer(bits=bits, group=32)
    rows = q.quantize_rows(values)
    assert rows.shape == (7, 3, q.row_bytes(64)) and q.row_bytes(64) == 64 * bits // 8 + 2 * 2 * 2
    back = q.dequantize_rows(rows, 64)
    grouped = values.unflatten(-1, (2, 32))
    bound = max_error_bound(grouped, bits, dim=-1).expand_as(grouped).flatten(-2)
    assert bool(((back - values).abs() <= bound).all())


def test_error_shrinks_with_bits():
    keys = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(2))
    errors = []
    for bits in (2, 4, 8):
        q = KVQuantizer(bits=bits)
        codes, scale, zero = q.quantize_key_groups(keys)
        errors.append(float((q.dequantize_keys(codes, scale[:, None], zero[:, None]) - keys).abs().mean()))
    assert errors[0] > 3 * errors[1] > 9 * errors[2]


def test_constant_slice_is_exact_and_out_of_fp16_range_is_refused():
    x = torch.full((2, 32, 8), 0.75)
    codes, scale, zero = quantize_along(x, 2, dim=-2)
    assert torch.equal(codes.float() * scale.float() + zero.float(), x)
    with pytest.raises(ValueError, match="fp16 range"):
        quantize_along(torch.tensor([1e6, 0.0]), 4, dim=-1)
