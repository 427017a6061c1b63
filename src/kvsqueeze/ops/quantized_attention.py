"""Attention over a QuantizedKV, dequantizing one block of entries at a time.

A quantized cache saves memory only if attention never rebuilds it in full
precision. The torch path walks the store's blocks (QuantizedKV.blocks: a block of
entries of every head, dequantized, then the full-precision residual) with an online
softmax (the flash-attention recurrence: running max, running sum, rescaled
accumulator), so at most one block is ever dequantized. All heads go through each
block together, padded to the longest: a handful of batched matmuls per layer
instead of one call per head. It computes in fp32 and is the oracle for the fused
kernels decode steps take: Triton on CUDA (triton_quantized_decode.py), C++ on the
CPU (cpu_quantized_decode.py).
"""

from __future__ import annotations

import torch

from kvsqueeze.ops._triton import use_triton
from kvsqueeze.ops.cpu_quantized_decode import quantized_flat_decode_cpu, quantized_kernel_available
from kvsqueeze.ops.ragged_attention import needs_mask
from kvsqueeze.store.quantized_kv import QuantizedKV

# Entries per block: a [heads, block, head_dim] fp32 tile of keys and one of values.
BLOCK = 512


def quantized_attention(
    query: torch.Tensor,
    kv: QuantizedKV,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """ops.ragged_attention's contract over a QuantizedKV: query [heads, group, q, d],
    query_positions [heads, q]; returns [heads, group, q, d] in the query's dtype."""
    decode = query.shape[2] == 1 and kv.quantizer.keys_per_channel
    if decode and use_triton(query, kv.codes.keys):
        from kvsqueeze.ops.triton_quantized_decode import quantized_decode_attention

        return quantized_decode_attention(query, kv, scaling, query_positions, sliding_window)
    if decode and query.device.type == "cpu" and quantized_kernel_available():
        masked = needs_mask(kv, query_positions, sliding_window)
        return quantized_flat_decode_cpu(query, kv, query_positions, scaling, sliding_window, masked)
    return quantized_attention_reference(query, kv, query_positions, scaling, sliding_window)


def quantized_attention_reference(
    query: torch.Tensor,
    kv: QuantizedKV,
    query_positions: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """quantized_attention in plain torch, block by block. A query sees entries at
    positions <= its own (and fewer than `sliding_window` behind it); one that sees
    nothing gets zeros."""
    h, g, q, d = query.shape
    rows = query.reshape(h, g * q, d).float() * scaling
    # Row r of a head is query (r // q) of its group at query position r % q.
    row_positions = query_positions.reshape(h, 1, q).expand(h, g, q).reshape(h, g * q, 1)
    m = rows.new_full((h, g * q), float("-inf"))
    total = rows.new_zeros((h, g * q))
    acc = rows.new_zeros((h, g * q, d))
    for keys, values, positions, live in kv.blocks(block, torch.float32):
        scores = torch.bmm(rows, keys.transpose(1, 2))  # [h, g*q, b]
        seen = live[:, None, :] & (positions[:, None, :] <= row_positions)
        if sliding_window is not None:
            seen = seen & (row_positions - positions[:, None, :] < sliding_window)
        scores = scores.masked_fill(~seen, float("-inf"))
        m_new = torch.maximum(m, scores.amax(dim=-1))
        # A row that has seen nothing yet keeps max -inf; subtract 0 so exp gives 0, not NaN.
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp(scores - m_safe[..., None])
        alpha = torch.exp(m - m_safe)
        total = total * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + torch.bmm(p, values)
        m = m_new
    out = acc / torch.where(total > 0, total, 1.0)[..., None]
    return out.view(h, g, q, d).to(query.dtype)
