"""Memory bandwidth of a device, measured by timing a large copy (read + write)."""

from __future__ import annotations

import time

import torch


def measure_bandwidth(device: torch.device | str, nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second moved by `copy_` of an `nbytes` buffer (counting read and write)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of the pages
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best
