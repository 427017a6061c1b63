"""Decode attention over a ragged per-head KV cache: our Triton kernel against torch.

    python benchmarks/kernel_decode.py [--batch 16] [--context 32768] [--keep 0.2]
                                       [--q-heads 32] [--kv-heads 8] [--head-dim 128]
                                       [--dtype bf16] [--iters 50] [--tune]

Builds one layer's FlatKV with the Llama-3.1-8B attention shape (32 query heads, 8 kv
heads, d=128, bf16): every (sequence, kv-head) keeps a random number of tokens
around keep x context (0.5x to 1.5x). One decode step (one query per query head) is
then timed with CUDA events, after warmup, for:

  triton        ops/triton_decode.py: split-K over the ragged runs, GQA in one tile
  varlen_attn   torch.nn.attention.varlen.varlen_attn on the same buffer: each
                (sequence, kv-head) one "sequence" of keys, its query heads as its queries
  sdpa padded   F.scaled_dot_product_attention on the runs padded to the longest, masked
  sdpa loop     the torch reference: one SDPA per (sequence, kv-head) over views

and reported as time per step and achieved bandwidth: bytes of the kept K+V (what
the step must read, padding not counted) divided by the time. Needs CUDA and triton.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

from kvsqueeze.store import FlatKV

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_store(args: argparse.Namespace, device: torch.device) -> tuple[FlatKV, torch.Tensor]:
    """A tight FlatKV (no free slots) with ragged per-head lengths, and the queries."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    heads = args.batch * args.kv_heads
    mean = args.keep * args.context
    spread = 0.5 + torch.rand(heads, generator=gen, device=device)
    lengths = (mean * spread).long().clamp(1, args.context)
    total = int(lengths.sum())
    dtype = DTYPES[args.dtype]
    keys = torch.randn(total, args.head_dim, generator=gen, device=device, dtype=dtype)
    values = torch.randn(total, args.head_dim, generator=gen, device=device, dtype=dtype)
    # Kept tokens keep their original positions: any increasing subset of the context.
    positions = torch.cat(
        [torch.randperm(args.context, generator=gen, device=device)[:n].sort().values for n in lengths.tolist()]
    )
    kv = FlatKV(keys, values, positions.to(torch.int32), lengths, lengths.clone())
    group = args.q_heads // args.kv_heads
    query = torch.randn(heads, group, 1, args.head_dim, generator=gen, device=device, dtype=dtype)
    return kv, query


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Mean seconds per call, by CUDA events around `iters` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def candidates(
    kv: FlatKV, query: torch.Tensor, q_pos: torch.Tensor, scaling: float
) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a function that runs one decode step and returns [heads, group, 1, d]."""
    import torch.nn.functional as F

    from kvsqueeze.ops import ragged_attention_reference
    from kvsqueeze.ops.triton_decode import ragged_decode_attention

    h, g, _, d = query.shape
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "triton": lambda: ragged_decode_attention(query, kv, scaling, q_pos),
        "triton (no position mask)": lambda: ragged_decode_attention(query, kv, scaling),
    }

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        varlen_attn = None
    if varlen_attn is not None:
        # Each (sequence, kv-head) is one varlen "sequence": its g query heads are g query
        # rows against its run of keys (one kv head), full (non-causal) attention.
        q_rows = query.reshape(h * g, 1, d)
        cu_q = torch.arange(0, h * g + 1, g, device=query.device, dtype=torch.int32)
        cu_k = kv.cu_seqlens.to(torch.int32)
        max_k = int(kv.lengths.max())
        k3, v3 = kv.keys.view(-1, 1, d), kv.values.view(-1, 1, d)
        # Its default scale is d ** -0.5, the scaling used here (older releases take no `scale`).
        runs["varlen_attn"] = lambda: varlen_attn(q_rows, k3, v3, cu_q, cu_k, g, max_k).view(h, g, 1, d)

    # Padded dense: every run copied once (outside the timing) into [heads, longest, d].
    longest = int(kv.lengths.max())
    offs = torch.arange(longest, device=query.device)
    inside = offs[None, :] < kv.lengths[:, None]
    slots = kv.slots(offs[None, :].expand(h, longest)).clamp_max(kv.keys.shape[0] - 1)
    k_pad = torch.where(inside[..., None], kv.keys[slots], 0).unsqueeze(1)  # [h, 1, longest, d]
    v_pad = torch.where(inside[..., None], kv.values[slots], 0).unsqueeze(1)
    mask = inside[:, None, None, :]  # [h, 1, 1, longest]
    # The group as g query rows of one head (as the reference does): no GQA support needed
    # from the backend, so a masked kernel (memory-efficient attention) can serve it.
    q_rows4 = query.view(h, 1, g, d)
    runs["sdpa padded"] = lambda: F.scaled_dot_product_attention(
        q_rows4, k_pad, v_pad, attn_mask=mask, scale=scaling
    ).view(h, g, 1, d)
    runs["sdpa loop (reference)"] = lambda: ragged_attention_reference(query, kv, q_pos, scaling)
    return runs


def tune(
    kv: FlatKV, query: torch.Tensor, q_pos: torch.Tensor, scaling: float, warmup: int, iters: int, kv_bytes: int
) -> None:
    """Try launch configurations of the Triton kernel; print them fastest first."""
    from kvsqueeze.ops.triton_decode import default_chunk_size, ragged_decode_attention

    rows = []
    for block_n in (32, 64, 128):
        base = default_chunk_size(kv.keys.shape[0], block_n, query.device)
        for chunk in sorted({base // 2 // block_n * block_n or block_n, base, base * 2}):
            for num_warps in (4, 8):
                for num_stages in (2, 3, 4):
                    cfg = dict(block_n=block_n, chunk_size=chunk, num_warps=num_warps, num_stages=num_stages)
                    try:
                        seconds = time_cuda(
                            lambda c=cfg: ragged_decode_attention(query, kv, scaling, q_pos, **c), warmup, iters
                        )
                    except Exception as error:  # e.g. out of shared memory for this tile
                        print(f"  {cfg}: failed ({type(error).__name__})")
                        continue
                    rows.append((seconds, cfg))
    for seconds, cfg in sorted(rows, key=lambda r: r[0])[:10]:
        print(f"  {seconds * 1e6:8.1f} us  {kv_bytes / seconds / 1e12:5.2f} TB/s  {cfg}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--keep", type=float, default=0.2)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-loop", action="store_true", help="skip the slow per-head torch loop")
    parser.add_argument("--tune", action="store_true", help="also sweep the Triton kernel's launch configuration")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernel_decode.py needs a CUDA GPU; none is available here", file=sys.stderr)
        sys.exit(2)
    from kvsqueeze.ops._triton import triton_available

    if not triton_available():
        print("kernel_decode.py needs triton (pip install triton)", file=sys.stderr)
        sys.exit(2)
    if args.q_heads % args.kv_heads or not 0 < args.keep <= 1:
        parser.error("--q-heads must be a multiple of --kv-heads, and --keep in (0, 1]")

    device = torch.device("cuda")
    kv, query = build_store(args, device)
    scaling = args.head_dim**-0.5  # the models' scale, and varlen_attn's default
    q_pos = torch.full((kv.num_heads, 1), args.context, device=device)
    kv_bytes = 2 * kv.num_tokens * args.head_dim * kv.keys.element_size()
    lengths = kv.lengths.float()
    print(
        f"{torch.cuda.get_device_name()}: batch {args.batch}, context {args.context}, keep {args.keep}, "
        f"{args.q_heads}/{args.kv_heads} heads, d={args.head_dim}, {args.dtype}; "
        f"{kv.num_heads} runs of {int(lengths.min())}..{int(lengths.max())} tokens (mean {lengths.mean():.0f}), "
        f"K+V {kv_bytes / 1e6:.1f} MB"
    )

    from kvsqueeze.ops import ragged_attention_reference

    expected = ragged_attention_reference(query.float(), _as_float(kv), q_pos, scaling)
    runs = candidates(kv, query, q_pos, scaling)
    if args.skip_loop:
        runs.pop("sdpa loop (reference)")
    print(f"{'':28}{'us/step':>10}{'TB/s':>8}{'max |err|':>12}")
    for name, fn in runs.items():
        try:
            err = (fn().float() - expected).abs().max().item()
            iters = args.iters if "loop" not in name else max(3, args.iters // 10)
            seconds = time_cuda(fn, min(args.warmup, iters), iters)
        except Exception as error:  # one baseline failing (e.g. no flash kernel) must not hide the others
            print(f"{name:28}failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:80]}")
            continue
        print(f"{name:28}{seconds * 1e6:10.1f}{kv_bytes / seconds / 1e12:8.2f}{err:12.2e}")
    if args.tune:
        print("triton launch configurations, fastest first:")
        tune(kv, query, q_pos, scaling, args.warmup, args.iters, kv_bytes)


def _as_float(kv: FlatKV) -> FlatKV:
    """An fp32 copy of kv's keys and values, for the reference output."""
    return FlatKV(kv.keys.float(), kv.values.float(), kv.positions, kv.lengths, kv.capacity)


if __name__ == "__main__":
    main()
