"""Peak memory of a block of work: CUDA's allocator counter, or sampled RSS on CPU."""

from __future__ import annotations

import os
import threading

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Use as `with PeakMemory(device) as peak: ...`, then read `peak.bytes`.

    On CUDA: torch.cuda.max_memory_allocated over the block. On CPU: the highest
    resident set size sampled every few milliseconds during the block (large tensors
    are mmap-ed, so freeing them does lower RSS and per-block peaks are meaningful).
    """

    def __init__(self, device: torch.device | str, interval: float = 0.002) -> None:
        self.device, self.interval, self.bytes = torch.device(device), interval, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.bytes = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.bytes = max(self.bytes, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(self.bytes, rss_bytes())
