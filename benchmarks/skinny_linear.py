"""Few-row products over a whole model's weights: sgemm (F.linear) against the skinny
kernel (ops/skinny_linear.py) reading fp32 and bf16 weights.

The weights are SmolLM2-135M's linear layers (30 x q/k/v fused, o, gate/up fused,
down, and the 49152-row LM head: 537 MB in fp32), random, run in order as a forward
does, so each is read from memory, not from cache. Prints, per row count, the median
over --repeats passes of each path in ms and the weight bytes it read per second.

    .venv/bin/python benchmarks/skinny_linear.py --rows 1,3,8,16,32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from kvsqueeze.ops.skinny_linear import skinny_linear

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)] * LAYERS
SHAPES.append((VOCAB, HIDDEN))


def timed(product, weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    """Median seconds of one pass of `product` over every weight."""
    inputs = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            product(inputs[w.shape[1]], w)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,3,8,16,32", help="comma-separated row counts")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    fp32 = [torch.randn(shape, generator=gen) for shape in SHAPES]
    bf16 = [w.bfloat16() for w in fp32]
    gb32, gb16 = sum(w.nbytes for w in fp32) / 1e9, sum(w.nbytes for w in bf16) / 1e9
    print(f"threads {torch.get_num_threads()}; weights {gb32 * 1e3:.0f} MB fp32, {gb16 * 1e3:.0f} MB bf16")
    print(f"{'rows':>4} | {'F.linear fp32':>19} | {'skinny fp32':>19} | {'skinny bf16':>19}")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            sgemm = timed(F.linear, fp32, rows, args.repeats)
            s32 = timed(skinny_linear, fp32, rows, args.repeats)
            s16 = timed(skinny_linear, bf16, rows, args.repeats)
            cells = [f"{t * 1e3:7.1f} ms {gb / t:5.1f} GB/s" for t, gb in ((sgemm, gb32), (s32, gb32), (s16, gb16))]
            print(f"{rows:>4} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
