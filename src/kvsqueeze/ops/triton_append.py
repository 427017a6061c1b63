"""Append new entries to every head of a FlatKV, in place, in one Triton launch.

Why: a decode step appends one token to each (sequence, kv-head) of every layer. In
torch that is an index computation plus three scatters (keys, values, positions) and
an add to the lengths, five or more launches per layer; here it is one, reading
lengths on the device so that nothing syncs with the host.

What: program h writes head h's new entries to its free slots starts[h] + lengths[h],
... (skipping those marked invalid, e.g. padding), stores their positions as int32
and adds the number written to lengths[h]. It does not grow the store: the caller
guarantees every head has room (FlatKV keeps that bookkeeping on the host).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvsqueeze.ops._triton import launcher, next_pow2


@triton.jit
def _append_kernel(
    keys_ptr,
    values_ptr,
    pos_ptr,
    starts_ptr,
    lengths_ptr,
    new_k_ptr,
    new_v_ptr,
    new_pos_ptr,
    valid_ptr,
    num_new,
    stride_k,
    stride_v,
    stride_nk_h,
    stride_nk_q,
    stride_nv_h,
    stride_nv_q,
    stride_np_h,
    stride_np_q,
    stride_valid_h,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + head).to(tl.int64)
    length = tl.load(lengths_ptr + head)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    written = length.to(tl.int64) * 0  # a tensor counter (the interpreter's loop index is a Python int)
    for q0 in range(0, num_new, BLOCK_Q):
        offs_q = q0 + tl.arange(0, BLOCK_Q)
        ok = offs_q < num_new
        if HAS_VALID:
            flag = tl.load(valid_ptr + head * stride_valid_h + offs_q, mask=ok, other=0)
            ok = ok & (flag != 0)
        ok_i = ok.to(tl.int64)
        # Valid entries go to consecutive free slots, in order: exclusive prefix count.
        slots = start + length + written + tl.cumsum(ok_i, 0) - ok_i
        rows = offs_q.to(tl.int64)
        both = ok[:, None] & d_ok[None, :]
        k = tl.load(new_k_ptr + head * stride_nk_h + rows[:, None] * stride_nk_q + offs_d[None, :], mask=both)
        v = tl.load(new_v_ptr + head * stride_nv_h + rows[:, None] * stride_nv_q + offs_d[None, :], mask=both)
        p = tl.load(new_pos_ptr + head * stride_np_h + rows * stride_np_q, mask=ok)
        tl.store(keys_ptr + slots[:, None] * stride_k + offs_d[None, :], k, mask=both)
        tl.store(values_ptr + slots[:, None] * stride_v + offs_d[None, :], v, mask=both)
        tl.store(pos_ptr + slots, p.to(tl.int32), mask=ok)
        written += tl.sum(ok_i, 0)
    tl.store(lengths_ptr + head, length + written.to(length.dtype))


def append_tokens_triton(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    new_keys: torch.Tensor,
    new_values: torch.Tensor,
    new_positions: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> None:
    """Write new_keys/new_values[heads, q, d] (with new_positions [heads, q], [q] or a
    0-d tensor) into the store buffers keys/values[slots, d], positions[slots], after
    each head's live run, and advance lengths[heads]. valid[heads, q] False skips an
    entry. Everything is updated in place; the caller guarantees the free slots."""
    h, q, d = new_keys.shape
    if h == 0 or q == 0:
        return
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("the store's keys and values need contiguous rows")
    if new_keys.stride(-1) != 1:
        new_keys = new_keys.contiguous()
    if new_values.stride(-1) != 1:
        new_values = new_values.contiguous()
    new_positions = new_positions.expand(h, q)  # stride 0 over heads: no copy
    if valid is not None:
        valid = valid.expand(h, q)
        if valid.dtype == torch.bool:
            valid = valid.contiguous().view(torch.uint8)  # bool pointers are awkward in Triton
        elif valid.stride(-1) != 1:
            valid = valid.contiguous()
    d_pad = max(16, next_pow2(d))
    block_q = min(next_pow2(q), max(1, 4096 // d_pad))
    launcher(_append_kernel, keys.device)[(h,)](
        keys,
        values,
        positions,
        starts,
        lengths,
        new_keys,
        new_values,
        new_positions,
        valid if valid is not None else lengths,
        q,
        keys.stride(0),
        values.stride(0),
        new_keys.stride(0),
        new_keys.stride(1),
        new_values.stride(0),
        new_values.stride(1),
        new_positions.stride(0),
        new_positions.stride(1),
        valid.stride(0) if valid is not None else 0,
        HEAD_DIM=d,
        D_PAD=d_pad,
        BLOCK_Q=block_q,
        HAS_VALID=valid is not None,
        num_warps=1 if q * d_pad <= 1024 else 4,
    )
