"""SnapKV scoring fused in Triton: the window's attention to every key, summed over
the window, without materializing the [window, tokens] probabilities.

Why: the policy's scorer (policy/score/snapkv.py, the oracle) forms fp32 logits for
group x window rows against all t keys of every head, b * hq * w * t * 4 bytes (half
a GiB per layer for a batch of 16 at 32k tokens) plus a softmax over it. Here keys
are read twice, once for the softmax statistics and once for the probabilities, and
only the summed scores [b, hq, t] are written.

How: a program owns a block of GQA groups of one (sequence, kv-head), all their
window queries as the rows of one tile (group-major, window padded to a power of
two), and a chunk of the keys. Pass 1 writes each row's online (max, sum) over its
chunk; torch merges the chunks into a log-sum-exp per row; pass 2 recomputes the
logits, turns them into probabilities and sums the window rows of each group, so the
output stays per query head. Causality inside the window (query i sees keys up to
its own position), the layer's sliding window (query q sees key k when q - k <
sliding_window) and padding keys are masked as in attention_probs. Pooling and the
reduction over the GQA group stay in torch (SnapKVScorer.from_window_sums): they are
cheap and exactly the policy's.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvsqueeze.ops._triton import dot_precision, launcher, next_pow2, sm_count
from kvsqueeze.policy.score.base import ScoreInput
from kvsqueeze.policy.score.snapkv import SnapKVScorer

LOG2E = 1.4426950408889634
MAX_ROWS = 128  # window rows x groups held by one program: a [128, d] query tile
MAX_WINDOW = MAX_ROWS


@triton.jit
def _snapkv_kernel(
    q_ptr,
    k_ptr,
    valid_ptr,
    m_ptr,
    l_ptr,
    lse_ptr,
    out_ptr,
    t,
    q_start,
    w,
    sliding,
    kv_heads,
    group_blocks,
    chunk,
    num_chunks,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_valid_b,
    GROUP: tl.constexpr,
    G_BLK: tl.constexpr,
    W_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    ROWS: tl.constexpr,
    STATS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    c = tl.program_id(1)
    bh = pid // group_blocks
    g_first = (pid % group_blocks) * G_BLK
    b = (bh // kv_heads).to(tl.int64)
    kvh = (bh % kv_heads).to(tl.int64)

    offs_r = tl.arange(0, ROWS)
    g = g_first + offs_r // W_PAD  # rows are group-major: row = group * W_PAD + window index
    i = offs_r % W_PAD
    row_ok = (g < GROUP) & (i < w)
    q_pos = q_start + i
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_rows = q_ptr + b * stride_qb + (kvh * GROUP + g) * stride_qh + q_pos.to(tl.int64) * stride_qt
    q = tl.load(q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh

    lo = c * chunk
    hi = tl.minimum(lo + chunk, t)
    stat = (pid.to(tl.int64) * num_chunks + c) * ROWS + offs_r
    if STATS:
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
    else:
        lse = tl.load(lse_ptr + pid.to(tl.int64) * ROWS + offs_r)  # +inf for rows that see nothing
        offs_gb = tl.arange(0, G_BLK)
        out_rows = out_ptr + ((b * kv_heads + kvh) * GROUP + g_first + offs_gb).to(tl.int64) * t
        out_ok = (g_first + offs_gb) < GROUP

    for j0 in range(lo, hi, BLOCK_T):
        offs_j = j0 + tl.arange(0, BLOCK_T)
        in_range = offs_j < hi
        flag = tl.load(valid_ptr + b * stride_valid_b + offs_j, mask=in_range, other=0)
        col_ok = in_range & (flag != 0)
        k = tl.load(
            k_base + offs_j.to(tl.int64)[:, None] * stride_kt + offs_d[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [ROWS, BLOCK_T], log2 units
        behind = q_pos[:, None] - offs_j[None, :]
        seen = row_ok[:, None] & col_ok[None, :] & (behind >= 0) & (behind < sliding)
        s = tl.where(seen, s, float("-inf"))
        if STATS:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        else:
            p = tl.exp2(s - lse[:, None])
            score = tl.sum(tl.reshape(p, (G_BLK, W_PAD, BLOCK_T)), 1)  # sum over each group's window
            # Every in-range column is written (padding keys score 0): the output starts empty.
            tl.store(out_rows[:, None] + offs_j[None, :], score, mask=out_ok[:, None] & in_range[None, :])

    if STATS:
        tl.store(m_ptr + stat, m_i)
        tl.store(l_ptr + stat, l_i)


def _layout(group: int, window: int, head_dim: int) -> tuple[int, int, int, int]:
    """(G_BLK, W_PAD, D_PAD, BLOCK_T): rows = G_BLK * W_PAD <= MAX_ROWS and >= 16 (tl.dot)."""
    w_pad = next_pow2(window)
    g_blk = max(1, min(next_pow2(group), MAX_ROWS // w_pad))
    w_pad = max(w_pad, 16 // g_blk)
    d_pad = max(16, next_pow2(head_dim))
    rows = g_blk * w_pad
    block_t = max(16, min(128, 8192 // rows, 16384 // d_pad))
    return g_blk, w_pad, d_pad, block_t


def supports(queries: torch.Tensor, window: int) -> bool:
    """Shapes the fused scorer handles: a window of at most MAX_WINDOW queries."""
    return 0 < min(window, queries.shape[2]) <= MAX_WINDOW and queries.dtype in (
        torch.float16,
        torch.bfloat16,
        torch.float32,
    )


def window_attention_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    scaling: float,
    window: int,
    sliding_window: int | None = None,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """sum over the last `window` queries of their causal softmax attention to every
    key (within `sliding_window`, if any), per query head: [b, hq, t] in fp32
    (attention_probs(...).sum(dim=3), unpooled)."""
    b, hq, t, d = queries.shape
    hkv = keys.shape[1]
    group = hq // hkv
    w = min(window, t)
    if not supports(queries, window):
        raise ValueError(f"fused SnapKV scoring takes 1..{MAX_WINDOW} window queries, got {w}")
    if queries.stride(-1) != 1:
        queries = queries.contiguous()
    if keys.stride(-1) != 1:
        keys = keys.contiguous()
    g_blk, w_pad, d_pad, block_t = _layout(group, w, d)
    rows = g_blk * w_pad
    group_blocks = triton.cdiv(group, g_blk)
    programs = b * hkv * group_blocks
    if chunk is None:
        wanted = 4 * (sm_count(queries.device.index or 0) if queries.is_cuda else 4)
        chunks = max(1, math.ceil(wanted / programs))
        chunk = block_t * max(1, math.ceil(t / (chunks * block_t)))
    num_chunks = triton.cdiv(t, chunk)
    valid_u8 = valid.to(torch.bool).contiguous().view(torch.uint8)

    f32 = dict(dtype=torch.float32, device=queries.device)
    m_part = torch.empty(programs, num_chunks, rows, **f32)
    l_part = torch.empty(programs, num_chunks, rows, **f32)
    out = torch.empty(b, hq, t, **f32)
    kernel = launcher(_snapkv_kernel, queries.device)
    common = dict(
        GROUP=group,
        G_BLK=g_blk,
        W_PAD=w_pad,
        HEAD_DIM=d,
        D_PAD=d_pad,
        BLOCK_T=block_t,
        ROWS=rows,  # G_BLK * W_PAD
        PRECISION=dot_precision(queries.dtype),
        num_warps=8 if rows >= 128 else 4,
    )
    # Without a sliding window every causal key is in reach: q - k < t always holds.
    reach = t if sliding_window is None else sliding_window
    args = [t, t - w, w, reach, hkv, group_blocks, chunk, num_chunks, scaling * LOG2E]
    args += [queries.stride(0), queries.stride(1), queries.stride(2)]
    args += [keys.stride(0), keys.stride(1), keys.stride(2), valid_u8.stride(0)]
    grid = (programs, num_chunks)
    kernel[grid](queries, keys, valid_u8, m_part, l_part, m_part, out, *args, STATS=True, **common)

    # Merge the chunks' (max, sum) into one log2-sum-exp per row; +inf where a row saw nothing.
    m_max = m_part.amax(dim=1, keepdim=True)
    m_safe = torch.where(m_max == float("-inf"), 0.0, m_max)
    total = (l_part * torch.exp2(m_part - m_safe)).sum(dim=1)
    m_safe = m_safe.squeeze(1)
    lse = torch.where(total > 0, m_safe + torch.log2(total), torch.full_like(total, float("inf"))).contiguous()

    kernel[grid](queries, keys, valid_u8, m_part, l_part, lse, out, *args, STATS=False, **common)
    return out


def snapkv_scores_for(scorer: SnapKVScorer, x: ScoreInput) -> torch.Tensor:
    """The fused equivalent of scorer(x)."""
    b, hq, t, _ = x.queries.shape
    hkv = x.keys.shape[1]
    sums = window_attention_sums(x.queries, x.keys, x.valid, x.scaling, x.window, x.sliding_window)
    return scorer.from_window_sums(sums.view(b, hkv, hq // hkv, t), min(x.window, t))
