"""Decode attention on CPU over the two store layouts and a padded dense cache.

    python benchmarks/paged_decode.py [--batch 16] [--kv-heads 3] [--group 3]
                                      [--head-dim 64] [--context 2048]
                                      [--keeps 0.125 1.0] [--iters 20] [--threads N]

One layer of a batch of sequences (SmolLM2-135M's attention shape by default: 3 kv
heads, 9 query heads, d=64, fp32) holds, per (sequence, kv-head), a ragged number of
tokens around keep x context (0.5x to 1.5x, as Ada-KV leaves them; all of them at keep
1.0). One decode step (one query per query head) is timed, median of `iters` after
warmup, for the torch paths that run on CPU:

  paged (padded gather)   ops.paged_attention_reference: the blocks gathered into one
                          [heads, longest, d] tensor, one batched SDPA (the paged CPU path)
  paged (per-head SDPA)   ops.ragged_attention_reference over the PagedKV: each head's
                          blocks gathered, one SDPA per head (the alternative, measured)
  flat (per-head SDPA)    ops.ragged_attention_reference over a FlatKV: one SDPA per
                          head over views, no copy
  padded SDPA             a dense [batch, kv_heads, longest, d] cache (what a plain
                          cache holds, padded to the longest head), one SDPA with GQA
                          and a length mask

and printed as a table: time per step and the kept K/V each path reads. On a shared
or busy machine pass --threads 1: with more threads than free cores, torch's OpenMP
barriers wait for descheduled threads and a 0.3 ms SDPA was seen taking 95 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kvsqueeze.ops import paged_attention_reference, ragged_attention_reference
from kvsqueeze.store import BlockPool, FlatKV, PagedKV


def build(args: argparse.Namespace, keep: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values [heads, context, d], keep mask [heads, context], query [heads, group, 1, d])."""
    gen = torch.Generator().manual_seed(args.seed)
    heads = args.batch * args.kv_heads
    spread = 0.5 + torch.rand(heads, generator=gen) if keep < 1 else torch.ones(heads)
    lengths = (keep * args.context * spread).long().clamp(1, args.context)
    keys = torch.randn(heads, args.context, args.head_dim, generator=gen)
    values = torch.randn(heads, args.context, args.head_dim, generator=gen)
    # Each head keeps a random subset of the context, in order.
    ranks = torch.rand(heads, args.context, generator=gen).argsort(dim=-1).argsort(dim=-1)
    mask = ranks < lengths[:, None]
    query = torch.randn(heads, args.group, 1, args.head_dim, generator=gen)
    return keys, values, mask, query


def candidates(args: argparse.Namespace, keep: float) -> tuple[dict[str, Callable[[], torch.Tensor]], int]:
    """name -> one decode step returning [heads, group, 1, d]; and the kept K/V bytes."""
    keys, values, mask, query = build(args, keep)
    heads, d, scale = keys.shape[0], args.head_dim, args.head_dim**-0.5
    q_pos = torch.full((heads, 1), args.context)
    flat = FlatKV.from_dense(keys, values, mask)
    pool = BlockPool(int((flat.lengths + 15).div(16, rounding_mode="floor").sum()) + heads, d)
    paged = PagedKV.from_dense(pool, keys, values, mask)
    # The padded dense cache: every head's kept entries at the front, padded to the longest.
    longest = int(flat.lengths.max())
    index = torch.arange(longest)
    inside = index[None, :] < flat.lengths[:, None]
    k_pad, v_pad = torch.zeros(heads, longest, d), torch.zeros(heads, longest, d)
    for h, (k, v, _) in enumerate(flat.runs()):
        k_pad[h, : len(k)], v_pad[h, : len(v)] = k, v
    b, hkv = args.batch, args.kv_heads
    k_pad, v_pad = k_pad.view(b, hkv, longest, d), v_pad.view(b, hkv, longest, d)
    # Query head j reads kv head j // group (enable_gqa), so its mask row is that head's.
    pad_mask = inside.view(b, hkv, 1, longest).repeat_interleave(args.group, dim=1)
    pad_mask = None if bool(inside.all()) else pad_mask
    q_dense = query.view(b, hkv * args.group, 1, d)

    def padded_sdpa() -> torch.Tensor:
        out = F.scaled_dot_product_attention(q_dense, k_pad, v_pad, attn_mask=pad_mask, scale=scale, enable_gqa=True)
        return out.view(heads, args.group, 1, d)

    runs = {
        "paged (padded gather)": lambda: paged_attention_reference(query, paged, q_pos, scale),
        "paged (per-head SDPA)": lambda: ragged_attention_reference(query, paged, q_pos, scale),
        "flat (per-head SDPA)": lambda: ragged_attention_reference(query, flat, q_pos, scale),
        "padded SDPA": padded_sdpa,
    }
    expected = runs["flat (per-head SDPA)"]()
    for name, fn in runs.items():  # every path computes the same attention
        torch.testing.assert_close(fn(), expected, atol=1e-4, rtol=1e-4, msg=name)
    return runs, flat.logical_nbytes()


def median_seconds(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--group", type=int, default=3, help="query heads per kv head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.125, 1.0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"decode attention, CPU fp32, {torch.get_num_threads()} threads: batch {args.batch}, "
        f"{args.kv_heads} kv heads x {args.group} query heads, d={args.head_dim}, context {args.context}"
    )
    print(f"{'keep':>6}  {'path':<24} {'ms/step':>8}  {'kept K/V':>9}")
    for keep in args.keeps:
        runs, kept = candidates(args, keep)
        for name, fn in runs.items():
            ms = median_seconds(fn, warmup=3, iters=args.iters) * 1e3
            print(f"{keep:>6}  {name:<24} {ms:8.2f}  {kept / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
