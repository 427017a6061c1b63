"""Decode attention over a QuantizedKV in Triton, dequantization fused into the loop.

Why: a quantized cache turns into decode speed only if attention reads the codes
themselves (a quarter of the bytes at int4) and never writes a full-precision copy.
Here the codes are loaded, shifted out of their bytes and scaled in registers, one
key group at a time, inside the online-softmax loop.

How: one program per (sequence, kv-head) holds its GQA group of queries as rows of
one tile (tl.dot needs 16 rows). It walks the head's key groups (KIVI, arXiv
2402.02750: one fp16 scale and zero per channel per group, so a group is one tile
whose scale and zero are loaded once), then its full-precision residual run.
Codes are planar (store/quantize.py): channel c of a token sits in byte c % m of
its m code bytes, at bit (c // m) * bits. A value row carries its own fp16 scales
and zeros after the codes; they are read through an fp16 view of the same rows.
Only per-channel keys (KIVI) are fused; the naive per-token baseline takes the
torch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvsqueeze.ops._triton import dot_precision, launcher, next_pow2
from kvsqueeze.store.quantized_kv import QuantizedKV

LOG2E = 1.4426950408889634


@triton.jit
def _online_step(
    q, k, v, pos, seen, q_pos, m_i, l_i, acc, qk_scale, window, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr
):
    """One tile of keys [N, D] and values [N, D] into the running softmax of q [G, D]."""
    seen = seen & (pos <= q_pos)
    if HAS_WINDOW:
        seen = seen & (q_pos - pos < window)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(seen[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen nothing yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _quantized_decode_kernel(
    q_ptr,
    out_ptr,
    q_pos_ptr,
    kc_ptr,  # key codes [slots, CODE_BYTES] uint8
    vr_ptr,  # value rows [slots, ROW_BYTES] uint8
    vr16_ptr,  # the same value rows as fp16 [slots, ROW_BYTES / 2]
    qpos_ptr,  # positions of quantized entries [slots] int32
    q_starts_ptr,
    q_lengths_ptr,
    scale_ptr,  # key group scales [groups, D] fp16
    zero_ptr,
    count_ptr,  # live entries per group [groups] int32
    g_starts_ptr,
    g_lengths_ptr,
    rk_ptr,  # residual keys [slots, D]
    rv_ptr,
    rpos_ptr,
    r_starts_ptr,
    r_lengths_ptr,
    window,
    qk_scale,
    stride_qh,
    stride_qg,
    stride_oh,
    stride_og,
    stride_rk,
    stride_rv,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    CODE_BYTES: tl.constexpr,
    ROW_BYTES: tl.constexpr,
    VALUE_GROUP: tl.constexpr,
    TOKENS: tl.constexpr,  # a key group's tile: next power of two >= G (and >= 16)
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < GROUP
    q = tl.load(q_ptr + head * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :], mask=g_ok[:, None], other=0.0)
    q = q.to(tl.float32)
    q_pos = tl.load(q_pos_ptr + head).to(tl.int32)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)

    # Where channel c's code sits: byte c % CODE_BYTES of the token's codes, bit shift (c // CODE_BYTES) * BITS.
    byte_of = offs_d % CODE_BYTES
    shift_of = ((offs_d // CODE_BYTES) * BITS).to(tl.uint8)
    code_mask = (1 << BITS) - 1
    value_scale_of = CODE_BYTES // 2 + offs_d // VALUE_GROUP  # in fp16 units within a row
    value_zero_of = value_scale_of + D // VALUE_GROUP

    q_start = tl.load(q_starts_ptr + head).to(tl.int64)
    g_start = tl.load(g_starts_ptr + head).to(tl.int64)
    n_groups = tl.load(g_lengths_ptr + head).to(tl.int32)
    offs_t = tl.arange(0, TOKENS)
    first = q_start  # slot of the current group's first entry
    group = g_start  # counted beside the loop: int64 offsets, and a tensor in the interpreter too
    for _ in range(0, n_groups):
        count = tl.load(count_ptr + group).to(tl.int32)
        live = offs_t < count
        slots = first + offs_t
        codes = tl.load(kc_ptr + slots[:, None] * CODE_BYTES + byte_of[None, :], mask=live[:, None], other=0)
        codes = ((codes >> shift_of[None, :]) & code_mask).to(tl.float32)
        scale = tl.load(scale_ptr + group * D + offs_d).to(tl.float32)
        zero = tl.load(zero_ptr + group * D + offs_d).to(tl.float32)
        k = codes * scale[None, :] + zero[None, :]
        vcodes = tl.load(vr_ptr + slots[:, None] * ROW_BYTES + byte_of[None, :], mask=live[:, None], other=0)
        vcodes = ((vcodes >> shift_of[None, :]) & code_mask).to(tl.float32)
        row16 = vr16_ptr + slots[:, None] * (ROW_BYTES // 2)
        vscale = tl.load(row16 + value_scale_of[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        vzero = tl.load(row16 + value_zero_of[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        v = vcodes * vscale + vzero
        pos = tl.load(qpos_ptr + slots, mask=live, other=0)
        m_i, l_i, acc = _online_step(q, k, v, pos, live, q_pos, m_i, l_i, acc, qk_scale, window, HAS_WINDOW, PRECISION)
        first += count
        group += 1

    r_start = tl.load(r_starts_ptr + head).to(tl.int64)
    r_len = tl.load(r_lengths_ptr + head).to(tl.int32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, r_len, BLOCK_N):
        live = n0 + offs_n < r_len
        slots = r_start + n0 + offs_n
        k = tl.load(rk_ptr + slots[:, None] * stride_rk + offs_d[None, :], mask=live[:, None], other=0.0)
        v = tl.load(rv_ptr + slots[:, None] * stride_rv + offs_d[None, :], mask=live[:, None], other=0.0)
        pos = tl.load(rpos_ptr + slots, mask=live, other=0)
        m_i, l_i, acc = _online_step(
            q,
            k.to(tl.float32),
            v.to(tl.float32),
            pos,
            live,
            q_pos,
            m_i,
            l_i,
            acc,
            qk_scale,
            window,
            HAS_WINDOW,
            PRECISION,
        )

    # A head with no entry (or none visible) has l = 0: its output is zeros, as in the reference.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    rows = out_ptr + head * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :]
    tl.store(rows, out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def quantized_decode_attention(
    query: torch.Tensor,
    kv: QuantizedKV,
    scaling: float,
    query_positions: torch.Tensor,
    sliding_window: int | None = None,
    block_n: int = 32,
) -> torch.Tensor:
    """ops.quantized_attention's contract for one query per head: query [heads, group,
    1, d], query_positions [heads] or [heads, 1]; returns [heads, group, 1, d]."""
    h, g, q_len, d = query.shape
    if q_len != 1:
        raise ValueError(f"quantized decode takes one query per head, got {q_len}")
    quantizer = kv.quantizer
    if not quantizer.keys_per_channel:
        raise ValueError("the fused kernel reads per-channel (KIVI) keys; per-token keys take the torch path")
    if d != next_pow2(d) or d < 16:
        raise ValueError(f"the fused kernel needs a power-of-two head_dim >= 16, got {d}")
    code_bytes, row_bytes = quantizer.code_bytes(d), quantizer.row_bytes(d)
    if code_bytes % 2:
        raise ValueError(f"{code_bytes} code bytes per token: the fused kernel needs an even count")
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if h == 0:
        return out
    query = query.contiguous()
    codes, groups, residual = kv.codes, kv.groups, kv.residual
    launcher(_quantized_decode_kernel, query.device)[(h,)](
        query,
        out,
        query_positions.reshape(h).contiguous(),
        codes.keys,
        codes.values,
        codes.values.view(torch.float16),
        codes.positions,
        codes.starts,
        codes.lengths,
        groups.keys,
        groups.values,
        groups.positions,
        groups.starts,
        groups.lengths,
        residual.keys,
        residual.values,
        residual.positions,
        residual.starts,
        residual.lengths,
        sliding_window or 0,
        scaling * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        residual.keys.stride(0),
        residual.values.stride(0),
        GROUP=g,
        G_PAD=max(16, next_pow2(g)),
        D=d,
        BITS=quantizer.bits,
        CODE_BYTES=code_bytes,
        ROW_BYTES=row_bytes,
        VALUE_GROUP=quantizer.channel_group(d),
        TOKENS=max(16, next_pow2(quantizer.group)),
        BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None,
        PRECISION=dot_precision(torch.float32),
    )
    return out
