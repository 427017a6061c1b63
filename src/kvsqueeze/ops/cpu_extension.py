"""kvsqueeze's CPU kernels (csrc/): compiled for this machine on first use.

torch.utils.cpp_extension builds them with the machine's C++ compiler and ninja and
caches the build under TORCH_EXTENSIONS_DIR (about a minute the first time, a
moment after). Where that cannot happen (no compiler) every caller takes its torch
path, and that is said once. KVSQUEEZE_CPU_KERNEL=0 turns the kernels off.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).parent / "csrc"
SOURCES = ["module.cpp", "paged_decode.cpp", "layer_ops.cpp", "block_slots.cpp"]
# -ffast-math lets the compiler vectorize exp (glibc's libmvec); the kernels use finite sentinels.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or is switched off."""
    if os.environ.get("KVSQUEEZE_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="kvsqueeze_cpu",
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=["-lmvec"],
        )
    except Exception as err:  # no compiler, no ninja, a failed build: the torch paths still work
        last = str(err).strip().splitlines()[-1:] or [type(err).__name__]
        warnings.warn(f"kvsqueeze's CPU kernels could not be built ({last[0]}); the slower torch paths run",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return None


def cpu_kernels_available() -> bool:
    """Whether the compiled kernels load (building them on the first call)."""
    return cpu_extension() is not None
