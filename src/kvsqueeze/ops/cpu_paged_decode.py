"""Paged decode attention on the CPU, from a small C++ kernel (csrc/paged_decode.cpp).

The torch path of a decode step gathers every head's blocks into a padded tensor,
casts it, builds a mask and runs SDPA: the cache is read and written several times
over, and the gather alone took half of a step at batch 16 x 2k. The kernel reads
each head's blocks in place, in their storage dtype, once. It is compiled for this
machine on first use (torch.utils.cpp_extension, cached under
TORCH_EXTENSIONS_DIR, about a minute the first time); where that cannot happen (no
compiler) the torch path runs, and that is said once. KVSQUEEZE_CPU_KERNEL=0 turns
the kernel off.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from kvsqueeze.store import PagedKV

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
# -ffast-math lets the compiler vectorize exp (glibc's libmvec); the kernel uses finite sentinels.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


@functools.cache
def _extension() -> ModuleType | None:
    if os.environ.get("KVSQUEEZE_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="kvsqueeze_paged_decode", sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-lmvec"])
    except Exception as err:  # no compiler, no ninja, a failed build: the torch path still works
        last = str(err).strip().splitlines()[-1:] or [type(err).__name__]
        warnings.warn(f"the CPU paged decode kernel could not be built ({last[0]}); decode takes the slower torch path",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return None


def cpu_kernel_available() -> bool:
    """Whether the compiled kernel loads (building it on the first call)."""
    return _extension() is not None


def paged_decode_cpu(
    query: torch.Tensor,
    stores: Sequence[PagedKV],
    query_positions: Sequence[int],
    scaling: float,
    sliding_window: int | None = None,
    masked: bool = True,
) -> torch.Tensor:
    """One query token per store: query [stores, heads, group, d] (store i's kv-heads
    and their GQA groups) at query_positions[i], over each store's live entries; all
    stores share one CPU pool. masked=False promises every entry is older than its
    query and inside any window (a plain decode step). Returns query's shape and dtype;
    a head with no entries gets zeros."""
    ext = _extension()
    if ext is None:
        raise RuntimeError("the CPU paged decode kernel is not available")
    pool = stores[0].pool
    return ext.paged_decode(
        query.contiguous(),
        pool.keys,
        pool.values,
        pool.positions,
        [kv.host_table for kv in stores],
        [kv.host_lengths for kv in stores],
        torch.tensor(list(query_positions), dtype=torch.int64),
        float(scaling),
        sliding_window or 0,
        masked,
    )
