"""kvsqueeze's CPU kernels (csrc/): compiled for this machine on first use.

torch.utils.cpp_extension builds them with the machine's C++ compiler and ninja, for
this CPU (-march=native), and caches the build under TORCH_EXTENSIONS_DIR, one per
CPU model (about a minute the first time, a moment after). Where that cannot happen
(no compiler) every caller takes its torch path, and that is said once.
KVSQUEEZE_CPU_KERNEL=0 turns the kernels off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).parent / "csrc"
SOURCES = ["module.cpp", "paged_decode.cpp", "layer_ops.cpp", "block_slots.cpp", "amx_linear.cpp"]
# -ffast-math lets the compiler vectorize exp (glibc's libmvec); the kernels use finite sentinels.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
# IEEE arithmetic, no fused multiply-adds (the last two flags change no value; they let
# rounding vectorise): for kernels whose results must equal torch's bit for bit.
EXACT_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]


def build_extension(name: str, sources: list[str], what: str, cflags: list[str] = CFLAGS) -> ModuleType | None:
    """Compile (or load the cached build of) csrc/`sources` as module `name` for this CPU;
    None, said once as a warning, where it cannot be built or KVSQUEEZE_CPU_KERNEL=0."""
    if os.environ.get("KVSQUEEZE_CPU_KERNEL", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"{name}_{_machine_tag()}",
            sources=[str(CSRC / source) for source in sources],
            extra_cflags=cflags,
            extra_ldflags=["-lmvec"],
        )
    except Exception as err:  # no compiler, no ninja, a failed build: the torch paths still work
        last = str(err).strip().splitlines()[-1:] or [type(err).__name__]
        warnings.warn(f"{what} could not be built ({last[0]}); the slower torch paths run",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return None


@functools.cache
def cpu_extension() -> ModuleType | None:
    """The compiled module, or None where it cannot be built or is switched off."""
    return build_extension("kvsqueeze_cpu", SOURCES, "kvsqueeze's CPU kernels")


def _machine_tag() -> str:
    """A short hash of this CPU's instruction-set flags. The kernels are compiled with
    -march=native, and the build cache is keyed by name: a home directory shared by
    machines of different CPUs must not hand one machine the other's build."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def require_cpu_extension() -> ModuleType:
    """The compiled module, for callers that have already chosen the kernel path."""
    ext = cpu_extension()
    if ext is None:
        raise RuntimeError("kvsqueeze's CPU kernels are not available")
    return ext


def cpu_kernels_available() -> bool:
    """Whether the compiled kernels load (building them on the first call)."""
    return cpu_extension() is not None
