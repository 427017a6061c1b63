"""Ragged decode attention over FlatKV in Triton: split-K ("flash-decoding") with GQA.

Why this exists: a decode step reads every kept K/V entry once, so it is bound by
memory bandwidth, and a compressed cache only turns into speed if that read is one
fused pass. The torch reference launches one SDPA per (sequence, kv-head); this is
two launches per layer whatever the batch.

How: each head's run of live entries is cut into chunks of `chunk_size` tokens and
every chunk is one program, so a few long heads are spread over many SMs instead of
serializing the step. Chunks are numbered head after head (cu_chunks is the prefix
sum of chunks per head); the grid is an upper bound on their number known on the host
(slots // chunk_size + heads), so launching needs no device sync and surplus programs
do nothing. A program holds all query heads of its GQA group as rows of one tile, so
K/V are read once per group and never repeated: scores are tl.dot of [group, d] x
[d, BLOCK_N], accumulated in fp32 with an online softmax. A second small kernel
merges each head's chunk partials (max, sum, weighted values).

Masking by position (a query sees entries at positions <= its own, and fewer than
`sliding_window` behind it) is optional and costs one int32 load per entry.

The same kernel reads a paged store (PagedKV, see triton_paged_decode.py): with PAGE
> 0 a head's entry i sits in slot block_table[head, i // PAGE] * PAGE + i % PAGE of
the pool instead of starts[head] + i; everything else is shared.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvsqueeze.ops._triton import dot_precision, launcher, next_pow2, sm_count
from kvsqueeze.store import FlatKV

LOG2E = 1.4426950408889634


@triton.jit
def _decode_chunk_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    starts_ptr,
    table_ptr,
    lengths_ptr,
    cu_chunks_ptr,
    q_pos_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    num_heads,
    search_steps,
    chunk_size,
    window,
    qk_scale,
    stride_qh,
    stride_qg,
    stride_k,
    stride_v,
    stride_qpos,
    stride_table,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    MASK_BY_POSITION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    total = tl.load(cu_chunks_ptr + num_heads)
    active = pid < total

    # Which head owns chunk `pid`: the last h with cu_chunks[h] <= pid (binary search;
    # heads with no chunks share their cu value with the next head and are skipped).
    lo = pid * 0
    hi = lo + num_heads
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        right = tl.load(cu_chunks_ptr + mid) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    head = lo

    chunk = pid - tl.load(cu_chunks_ptr + head)
    if PAGE == 0:
        start = tl.load(starts_ptr + head).to(tl.int64)
    length = tl.load(lengths_ptr + head).to(tl.int32)
    lo_tok = chunk * chunk_size
    hi_tok = tl.minimum(lo_tok + chunk_size, length)
    hi_tok = tl.where(active, hi_tok, lo_tok)  # surplus programs loop zero times

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q_rows = q_ptr + head.to(tl.int64) * stride_qh + offs_g[:, None] * stride_qg + offs_d[None, :]
    q = tl.load(q_rows, mask=(offs_g[:, None] < GROUP) & d_ok[None, :], other=0.0)

    if MASK_BY_POSITION:
        q_pos = tl.load(q_pos_ptr + head.to(tl.int64) * stride_qpos).to(tl.int32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for n0 in range(lo_tok, hi_tok, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_run = offs_n < hi_tok
        if PAGE == 0:
            slots = start + offs_n
        else:
            block = tl.load(table_ptr + head.to(tl.int64) * stride_table + offs_n // PAGE, mask=in_run, other=0)
            slots = block.to(tl.int64) * PAGE + offs_n % PAGE
        k = tl.load(
            k_ptr + slots[:, None] * stride_k + offs_d[None, :], mask=in_run[:, None] & d_ok[None, :], other=0.0
        )
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G_PAD, BLOCK_N], log2 units
        seen = in_run
        if MASK_BY_POSITION:
            pos = tl.load(pos_ptr + slots, mask=in_run, other=0)
            seen = seen & (pos <= q_pos)
            if HAS_WINDOW:
                seen = seen & (q_pos - pos < window)
        s = tl.where(seen[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen nothing yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_ptr + slots[:, None] * stride_v + offs_d[None, :], mask=in_run[:, None] & d_ok[None, :], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    part = pid.to(tl.int64)
    # Only the group's real rows go out (the tile has at least 16 for tl.dot): partials stay
    # a few percent of the K/V bytes. A block mask: the interpreter mistypes block & scalar.
    row_ok = offs_g < tl.where(active, GROUP, 0)
    tl.store(m_ptr + part * G_PAD + offs_g, m_i, mask=row_ok)
    tl.store(l_ptr + part * G_PAD + offs_g, l_i, mask=row_ok)
    acc_rows = acc_ptr + (part * G_PAD + offs_g[:, None]) * D_PAD + offs_d[None, :]
    tl.store(acc_rows, acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    cu_chunks_ptr,
    out_ptr,
    stride_oh,
    stride_og,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    head = tl.program_id(0)
    c0 = tl.load(cu_chunks_ptr + head)
    c1 = tl.load(cu_chunks_ptr + head + 1)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    part = c0.to(tl.int64)  # counted beside the loop: int64 offsets, and a tensor in the interpreter too
    for _ in range(c0, c1):
        m_c = tl.load(m_ptr + part * G_PAD + offs_g, mask=g_ok, other=float("-inf"))
        l_c = tl.load(l_ptr + part * G_PAD + offs_g, mask=g_ok, other=0.0)
        acc_rows = acc_ptr + (part * G_PAD + offs_g[:, None]) * D_PAD + offs_d[None, :]
        acc_c = tl.load(acc_rows, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m_i, m_c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        beta = tl.exp2(m_c - m_safe)
        l_i = l_i * alpha + l_c * beta
        acc = acc * alpha[:, None] + acc_c * beta[:, None]
        m_i = m_new
        part += 1

    # A head with no entry (or none visible) has l = 0: its output is zeros, as in the reference.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    rows = out_ptr + head.to(tl.int64) * stride_oh + offs_g[:, None] * stride_og + offs_d[None, :]
    tl.store(rows, out, mask=g_ok[:, None] & d_ok[None, :])


def default_block_n(head_dim: int) -> int:
    """Keys per inner step: keep a K tile at about 16 KiB of half precision."""
    return max(16, min(128, 8192 // next_pow2(head_dim)))


def default_chunk_size(slots: int, block_n: int, device: torch.device) -> int:
    """Tokens per program: about eight programs per SM, so that the last wave's tail is
    short, counted from the slot total (a host-side bound on live tokens: no sync).
    Partials then cost ~2% of the K/V bytes at the Llama-8B shape."""
    target = 8 * (sm_count(device.index or 0) if device.type == "cuda" else 4)
    return block_n * max(1, math.ceil(slots / (target * block_n)))


def ragged_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    starts: torch.Tensor | None,
    lengths: torch.Tensor,
    scaling: float,
    positions: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    sliding_window: int | None = None,
    *,
    block_table: torch.Tensor | None = None,
    page_size: int = 0,
    block_n: int | None = None,
    chunk_size: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of one query per query head, query[heads, group, 1, d], over the runs
    keys/values[starts[h] : starts[h] + lengths[h]] of a [slots, d] buffer; or, with
    block_table [heads, blocks] and page_size (starts then unused), over entry i of
    head h at slot block_table[h, i // page_size] * page_size + i % page_size.

    With query_positions[heads] (or [heads, 1]) and the entries' positions[slots], a
    query sees only entries at positions <= its own, and with `sliding_window` only
    those fewer than that many behind it. A query that sees nothing gets zeros.
    Returns [heads, group, 1, d] in the query's dtype.
    """
    h, g, q_len, d = query.shape
    if q_len != 1:
        raise ValueError(f"ragged_decode takes one query per head, got {q_len}")
    if sliding_window is not None and query_positions is None:
        raise ValueError("a sliding window needs query_positions and positions")
    mask_by_position = query_positions is not None
    if mask_by_position and positions is None:
        raise ValueError("query_positions need the entries' positions")
    out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if h == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys and values need contiguous rows")
    if keys.dtype != query.dtype:
        raise ValueError(f"query dtype {query.dtype} differs from the cache's {keys.dtype}")

    d_pad = max(16, next_pow2(d))
    g_pad = max(16, next_pow2(g))  # tl.dot needs at least 16 rows
    block_n = block_n or default_block_n(d_pad)
    slots = keys.shape[0]
    if block_table is not None:  # a head's entries fit in its blocks: a tighter bound than the pool
        slots = min(slots, h * block_table.shape[1] * page_size)
    chunk_size = chunk_size or default_chunk_size(slots, block_n, query.device)
    if chunk_size % block_n:
        raise ValueError(f"chunk_size {chunk_size} must be a multiple of block_n {block_n}")

    n_chunks = (lengths.to(torch.int32) + (chunk_size - 1)) // chunk_size
    cu_chunks = torch.zeros(h + 1, dtype=torch.int32, device=query.device)
    torch.cumsum(n_chunks, 0, dtype=torch.int32, out=cu_chunks[1:])
    grid_size = slots // chunk_size + h  # >= sum of ceil(length / chunk_size), since sum(lengths) <= slots

    f32 = dict(dtype=torch.float32, device=query.device)
    m_part = torch.empty(grid_size, g_pad, **f32)
    l_part = torch.empty(grid_size, g_pad, **f32)
    acc_part = torch.empty(grid_size, g_pad, d_pad, **f32)
    if mask_by_position:
        q_pos = query_positions.reshape(h, -1)
        pos_arg, q_pos_arg, stride_qpos = positions, q_pos, q_pos.stride(0)
    else:  # never read: the constexpr flag compiles the loads away
        pos_arg, q_pos_arg, stride_qpos = lengths, lengths, 0

    launcher(_decode_chunk_kernel, query.device)[(grid_size,)](
        query,
        keys,
        values,
        pos_arg,
        starts if starts is not None else lengths,  # never read when paged
        block_table if block_table is not None else lengths,  # never read when flat
        lengths,
        cu_chunks,
        q_pos_arg,
        m_part,
        l_part,
        acc_part,
        h,
        (h - 1).bit_length(),
        chunk_size,
        sliding_window or 0,
        scaling * LOG2E,
        query.stride(0),
        query.stride(1),
        keys.stride(0),
        values.stride(0),
        stride_qpos,
        block_table.stride(0) if block_table is not None else 0,
        GROUP=g,
        G_PAD=g_pad,
        HEAD_DIM=d,
        D_PAD=d_pad,
        BLOCK_N=block_n,
        PAGE=page_size if block_table is not None else 0,
        MASK_BY_POSITION=mask_by_position,
        HAS_WINDOW=sliding_window is not None,
        PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    launcher(_decode_reduce_kernel, query.device)[(h,)](
        m_part,
        l_part,
        acc_part,
        cu_chunks,
        out,
        out.stride(0),
        out.stride(1),
        GROUP=g,
        G_PAD=g_pad,
        HEAD_DIM=d,
        D_PAD=d_pad,
        num_warps=4,
    )
    return out


def ragged_decode_attention(
    query: torch.Tensor,
    kv: FlatKV,
    scaling: float,
    query_positions: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **launch: int,
) -> torch.Tensor:
    """ragged_decode over a FlatKV's live entries (same contract as ops.ragged_attention
    with q == 1). `launch` passes block_n, chunk_size, num_warps, num_stages through."""
    positions = kv.positions if query_positions is not None else None
    return ragged_decode(
        query, kv.keys, kv.values, kv.starts, kv.lengths, scaling, positions, query_positions, sliding_window, **launch
    )
