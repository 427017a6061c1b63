"""The fused quantized decode kernel (ops/triton_quantized_decode.py) against the torch
path, run by Triton's interpreter on CPU (see tests/test_triton_kernels.py for how)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvsqueeze.ops.quantized_attention import quantized_attention_reference  # noqa: E402
from kvsqueeze.ops.triton_quantized_decode import quantized_decode_attention  # noqa: E402
from kvsqueeze.store.quantize import KVQuantizer  # noqa: E402
from kvsqueeze.store.quantized_kv import QuantizedKV  # noqa: E402

D = 32


def make_store(bits: int, seed: int = 0) -> QuantizedKV:
    """Five heads: one with nothing kept, groups shrunk by eviction, residuals of
    different lengths after a few decode appends."""
    gen = torch.Generator().manual_seed(seed)
    heads, t = 5, 70
    keys, values = torch.randn(heads, t + 6, D, generator=gen), torch.randn(heads, t + 6, D, generator=gen)
    keys[..., 3] *= 8  # an outlier channel, as real keys have
    keep = torch.rand(heads, t, generator=gen) < torch.tensor([0.0, 0.3, 0.6, 1.0, 0.9])[:, None]
    kv = QuantizedKV.from_dense(
        keys[:, :t], values[:, :t], keep, quantizer=KVQuantizer(bits=bits, group=8), residual_len=5
    )
    kv.evict(torch.rand(heads, int(kv.lengths.max()), generator=gen) > 0.25)
    for i in range(t, t + 6):
        kv.append(keys[:, i : i + 1], values[:, i : i + 1], torch.tensor([i]))
    return kv


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("window", [None, 30])
def test_fused_kernel_equals_the_torch_path(bits, window):
    kv = make_store(bits)
    query = torch.randn(kv.num_heads, 3, 1, D, generator=torch.Generator().manual_seed(1))
    q_pos = torch.full((kv.num_heads, 1), 75)
    got = quantized_decode_attention(query, kv, D**-0.5, q_pos, window)
    want = quantized_attention_reference(query, kv, q_pos, D**-0.5, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_query_that_sees_nothing_gets_zeros_and_bad_shapes_are_refused():
    kv = make_store(4, seed=2)
    query = torch.randn(kv.num_heads, 2, 1, D, generator=torch.Generator().manual_seed(3))
    got = quantized_decode_attention(query, kv, 0.2, torch.full((kv.num_heads,), -1))
    assert torch.equal(got, torch.zeros_like(got))
    with pytest.raises(ValueError, match="one query per head"):
        quantized_decode_attention(query.expand(-1, -1, 2, -1), kv, 0.2, torch.zeros(kv.num_heads, 2))


@pytest.mark.parametrize("bits", [4, 2])
def test_fused_kernel_reads_a_store_fresh_from_the_prefill(bits):
    """Right after the prefill: no residual, each head's first key group short (its
    oldest n % G entries), int16 positions."""
    gen = torch.Generator().manual_seed(bits)
    heads, t = 4, 45
    keys, values = torch.randn(heads, t, D, generator=gen), torch.randn(heads, t, D, generator=gen)
    keep = torch.arange(t)[None, :] < torch.tensor([0, 3, 16, 45])[:, None]
    kv = QuantizedKV.from_dense(keys, values, keep, quantizer=KVQuantizer(bits=bits, group=8), residual_len=5)
    assert kv.residual.num_tokens == 0 and kv.codes.positions.dtype == torch.int16
    assert kv.groups.positions.tolist() == [3, 8, 8, 5, 8, 8, 8, 8, 8]
    query = torch.randn(heads, 3, 1, D, generator=gen)
    q_pos = torch.full((heads, 1), t)
    got = quantized_decode_attention(query, kv, D**-0.5, q_pos)
    want = quantized_attention_reference(query, kv, q_pos, D**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
