"""Attention over a QuantizedKV equals attention over its dequantized copy (fp32)."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.ops import attend, ragged_attention_reference
from kvsqueeze.ops.quantized_attention import quantized_attention_reference
from kvsqueeze.store.quantize import KVQuantizer
from kvsqueeze.store.quantized_kv import QuantizedKV

D = 32
TOL = dict(atol=2e-5, rtol=2e-5)


def make_store(bits: int, key_axis: str = "channel", seed: int = 0, head_dim: int = D) -> QuantizedKV:
    """Six heads keeping ragged random subsets of 90 tokens (one head keeps none),
    then a few decode appends: quantized runs, shrunken groups and residuals mixed."""
    gen = torch.Generator().manual_seed(seed)
    heads, t = 6, 90
    keys, values = (torch.randn(heads, t + 8, head_dim, generator=gen) for _ in range(2))
    keep = torch.rand(heads, t, generator=gen) < torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 0.3])[:, None]
    kv = QuantizedKV.from_dense(
        keys[:, :t], values[:, :t], keep, quantizer=KVQuantizer(bits=bits, group=8, key_axis=key_axis), residual_len=6
    )
    kv.evict(torch.rand(heads, int(kv.lengths.max()), generator=gen) > 0.2)
    for i in range(t, t + 8):
        kv.append(keys[:, i : i + 1], values[:, i : i + 1], torch.tensor([i]))
    return kv


@pytest.mark.parametrize("key_axis", ["channel", "token"])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("block", [4, 16, 512])
def test_decode_step_equals_attention_over_the_dequantized_cache(bits, key_axis, block):
    kv = make_store(bits, key_axis)
    query = torch.randn(kv.num_heads, 3, 1, D, generator=torch.Generator().manual_seed(1))
    q_pos = torch.full((kv.num_heads, 1), 98)
    got = quantized_attention_reference(query, kv, q_pos, D**-0.5, block=block)
    want = ragged_attention_reference(query, kv.dequantized(), q_pos, D**-0.5)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("window", [None, 20])
def test_a_chunk_with_causal_masking_and_a_window(window):
    """Several queries per head at earlier positions than some entries (a continued
    prompt), through the attend() dispatcher, with and without a sliding window."""
    kv = make_store(4, seed=2)
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(kv.num_heads, 3, 5, D, generator=gen)
    q_pos = torch.tensor([3, 40, 60, 80, 97])[None].expand(kv.num_heads, 5)
    got = attend(query, kv, q_pos, 0.3, window)
    want = ragged_attention_reference(query, kv.dequantized(), q_pos, 0.3, window)
    torch.testing.assert_close(got, want, **TOL)
    # Head 0 kept no prompt entry: its query at position 3 sees nothing and gets zeros.
    assert torch.equal(got[0, :, 0], torch.zeros_like(got[0, :, 0]))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("head_dim", [32, 64])  # 64 has its own compiled loops, 32 takes the generic ones
@pytest.mark.parametrize("positions", ["int16", "int32"])
def test_cpu_decode_kernel_equals_the_torch_path(bits, head_dim, positions):
    """The C++ decode kernel, through attend(): a plain step (no mask), a step at an
    earlier position with a window (masked), on shrunken groups and residuals."""
    from kvsqueeze.ops.cpu_quantized_decode import quantized_flat_decode_cpu, quantized_kernel_available

    if not quantized_kernel_available():
        pytest.skip("the quantized decode kernel cannot be built here")
    kv = make_store(bits, seed=7, head_dim=head_dim)
    newest = 98
    if positions == "int32":  # a position past int16's range widens the store's positions
        newest = 40_000
        entry = torch.randn(kv.num_heads, 1, head_dim)
        kv.append(entry, -entry, torch.tensor([newest]))
    assert kv.codes.positions.dtype == getattr(torch, positions)
    query = torch.randn(kv.num_heads, 3, 1, head_dim, generator=torch.Generator().manual_seed(8))
    for q_at, window in ((newest + 1, None), (60, 25)):
        q_pos = torch.full((kv.num_heads, 1), q_at)
        want = quantized_attention_reference(query, kv, q_pos, 0.3, window)
        torch.testing.assert_close(attend(query, kv, q_pos, 0.3, window), want, **TOL)
        torch.testing.assert_close(quantized_flat_decode_cpu(query, kv, q_pos, 0.3, window), want, **TOL)
    # Head 0 kept no prompt entry and its residual is newer than position 60: zeros.
    assert torch.equal(want[0], torch.zeros_like(want[0]))


def test_bf16_query_gets_bf16_output_close_to_the_dequantized_reference():
    kv = make_store(8, seed=4)
    query = torch.randn(kv.num_heads, 3, 1, D, generator=torch.Generator().manual_seed(5))
    q_pos = torch.full((kv.num_heads, 1), 98)
    got = quantized_attention_reference(query.bfloat16(), kv, q_pos, D**-0.5)
    want = ragged_attention_reference(query, kv.dequantized(), q_pos, D**-0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_blocks_never_hold_more_than_one_block_in_full_precision():
    kv = make_store(4, seed=6)
    sizes = [keys.shape[1] for keys, _, _, _ in kv.blocks(8)]
    assert max(sizes[:-1]) <= 8  # the last is the residual, at most R + G - 1 entries
    assert sizes[-1] == int(kv.residual.lengths.max())


def block_widths(kv: QuantizedKV, block: int) -> list[int]:
    """Widths of the quantized blocks (the residual's left out): the broadcast-scales
    shortcut cuts blocks at whole key groups, the general path at `block` entries."""
    widths = [keys.shape[1] for keys, _, _, _ in kv.blocks(block)]
    return widths[:-1] if int(kv.residual.lengths.max()) else widths


def check(kv: QuantizedKV, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(kv.num_heads, 3, 1, D, generator=gen)
    q_pos = torch.full((kv.num_heads, 1), 200)
    want = ragged_attention_reference(query, kv.dequantized(), q_pos, D**-0.5)
    for block in (5, 20, 512):
        got = quantized_attention_reference(query, kv, q_pos, D**-0.5, block=block)
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_the_shortcut_layouts_equal_the_general_path(bits):
    """Equal heads filling whole groups take the strided view and broadcast scales;
    heads whose first group is short (the prefill's oldest n % G entries, or shrunk by
    eviction) keep broadcast scales over gathered codes; eviction inside a later group
    takes them to the general path. Every layout equals the dequantized reference."""
    g = 8
    gen = torch.Generator().manual_seed(bits)
    keys, values = torch.randn(4, 120, D, generator=gen), torch.randn(4, 120, D, generator=gen)
    q = KVQuantizer(bits=bits, group=g)

    whole = QuantizedKV.from_dense(keys[:, :72], values[:, :72], torch.ones(4, 72, dtype=torch.bool), quantizer=q)
    assert block_widths(whole, 5) == [8] * 9  # shortcut: blocks of whole groups (5 rounded up to 8)
    check(whole)

    short = QuantizedKV.from_dense(keys[:, :75], values[:, :75], torch.ones(4, 75, dtype=torch.bool), quantizer=q)
    assert short.groups.positions[:2].tolist() == [3, 8] and block_widths(short, 5) == [8] * 10
    check(short)

    ragged_keep = torch.arange(120)[None, :] < torch.tensor([0, 13, 64, 101])[:, None]
    ragged = QuantizedKV.from_dense(keys, values, ragged_keep, quantizer=q, residual_len=6)
    assert block_widths(ragged, 5) == [8] * 13
    check(ragged)
    for i in range(120, 140):  # decoded groups after the short first ones: still the shortcut
        ragged.append(keys[:, i % 120 : i % 120 + 1], values[:, i % 120 : i % 120 + 1], torch.tensor([i]))
    assert ragged.codes.lengths.tolist() == [g, 13 + g, 64 + g, 101 + g] and block_widths(ragged, 5) == [8] * 14
    check(ragged, seed=1)

    keep = torch.ones(4, 121, dtype=torch.bool)
    keep[2, 0] = keep[3, 1] = False  # inside first groups: the shortcut holds, shifted further
    ragged.evict(keep)
    assert block_widths(ragged, 5) == [8] * 14
    check(ragged, seed=2)
    keep[2, 0] = keep[3, 1] = True
    keep[2, 40] = False  # inside a whole group: the general path
    ragged.evict(keep)
    longest = int(ragged.codes.lengths.max())
    assert longest == 108 and block_widths(ragged, 5) == [5] * 21 + [3]
    check(ragged, seed=3)
