"""Eviction's data movement for a FlatKV, in Triton: the kept rows of keys, values and
positions gathered into fresh buffers in one pass.

Why: eviction (after prefill, or every few steps when compressing during decoding)
rewrites the whole layer. In torch that is a gather per tensor (three launches, each
reading its own index); here one launch streams every kept row, its key, value and
position, to its place. FlatKV.evict decides which slots survive and where they go
(the layout arithmetic is the store's); this kernel is the RowGather it is given on
CUDA (ops.evict).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvsqueeze.ops._triton import launcher, next_pow2


@triton.jit
def _gather_kernel(
    keys_ptr,
    values_ptr,
    pos_ptr,
    src_ptr,
    out_k_ptr,
    out_v_ptr,
    out_pos_ptr,
    num_rows,
    stride_k,
    stride_v,
    stride_ok,
    stride_ov,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = offs_t < num_rows
    src = tl.load(src_ptr + offs_t, mask=in_range, other=0)
    offs_d = tl.arange(0, D_PAD)
    both = in_range[:, None] & (offs_d[None, :] < HEAD_DIM)
    # Only kept rows are read: eviction costs what it keeps, not what the layer held.
    k = tl.load(keys_ptr + src[:, None] * stride_k + offs_d[None, :], mask=both)
    v = tl.load(values_ptr + src[:, None] * stride_v + offs_d[None, :], mask=both)
    p = tl.load(pos_ptr + src, mask=in_range)
    tl.store(out_k_ptr + offs_t[:, None] * stride_ok + offs_d[None, :], k, mask=both)
    tl.store(out_v_ptr + offs_t[:, None] * stride_ov + offs_d[None, :], v, mask=both)
    tl.store(out_pos_ptr + offs_t, p, mask=in_range)


def gather_rows_triton(
    keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys[slots], values[slots], positions[slots]) as new tensors, in one launch
    (FlatKV's RowGather): keys/values [n_slots, d] with contiguous rows, slots [n]."""
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("keys and values need contiguous rows")
    n, d = len(slots), keys.shape[-1]
    out_k, out_v = keys.new_empty((n, d)), values.new_empty((n, d))
    out_pos = positions.new_empty((n,))
    if n:
        d_pad = max(16, next_pow2(d))
        block_t = max(16, min(128, 8192 // d_pad))
        launcher(_gather_kernel, keys.device)[(triton.cdiv(n, block_t),)](
            keys,
            values,
            positions,
            slots.contiguous(),
            out_k,
            out_v,
            out_pos,
            n,
            keys.stride(0),
            values.stride(0),
            out_k.stride(0),
            out_v.stride(0),
            HEAD_DIM=d,
            D_PAD=d_pad,
            BLOCK_T=block_t,
            num_warps=4,
        )
    return out_k, out_v, out_pos
