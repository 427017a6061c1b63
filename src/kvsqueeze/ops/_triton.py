"""Whether the Triton kernels can run, and which form of a kernel to launch.

Triton is optional: nothing here imports it until a kernel is actually wanted, so the
CPU path (and a machine without triton) never pays for it. The dispatchers route to
Triton only for CUDA tensors. A kernel launched on CPU tensors runs under Triton's
interpreter instead, one program at a time in numpy: far too slow for real use, but
it lets the tests check the very same kernel source on a machine without a GPU,
without setting TRITON_INTERPRET for the whole process (which would also turn the
compiled GPU kernels of any later test into interpreted ones).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch


@functools.cache
def triton_available() -> bool:
    """True when triton imports. Cached: the answer cannot change within a process."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken or mismatched install is the same as none: use torch
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a dispatcher should take the Triton path for these tensors. CUDA tensors
    without a working triton take the torch references, which are much slower on a GPU:
    that is said once, not silently."""
    if not all(t.is_cuda for t in tensors):
        return False
    if triton_available():
        return True
    _warn_no_triton()
    return False


@functools.cache
def _warn_no_triton() -> None:
    warnings.warn(
        "triton is not importable: kvsqueeze's GPU kernels are off and CUDA attention takes the slow "
        "torch reference; install the [gpu] extra",
        RuntimeWarning,
        stacklevel=3,
    )


_twins: dict[int, tuple[Any, Any]] = {}


def _twin(kernel: Any) -> Any:
    """The interpreted form of a @triton.jit function (cached)."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):  # TRITON_INTERPRET=1 was set: already interpreted
        return kernel
    # Keyed by id: hashing a JITFunction parses its source. The kernel is kept in the
    # value so that its id cannot be reused.
    if id(kernel) not in _twins:
        _twins[id(kernel)] = (kernel, InterpretedFunction(kernel.fn))
    return _twins[id(kernel)][1]


@contextlib.contextmanager
def _interpreting() -> Iterator[None]:
    """Let an interpreted kernel call compiled-mode @triton.jit helpers, then undo
    every change the interpreter made.

    Helpers such as tl.max, tl.sum or tl.zeros are themselves @triton.jit functions,
    created as compiled ones when triton was imported without TRITON_INTERPRET (by
    transformers, say): inside the scope each runs as its interpreted twin. The
    interpreter patches triton.language while it runs and does not undo all of it
    for nested helpers, which would break later GPU compilation in this process, so
    the attributes of everything it touches are restored afterwards.
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    touched = [JITFunction, tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.core.dtype]
    saved = [(obj, dict(vars(obj))) for obj in touched]

    def call_twin(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _twin(self)(*args, **kwargs)

    JITFunction.__call__ = call_twin
    try:
        yield
    finally:
        # Names the interpreter added to modules are left: its source rewriter puts
        # helpers into module globals that its cached rewrites keep using.
        for obj, before in saved:
            if isinstance(obj, type):
                for name in [n for n in vars(obj) if n not in before and n != "__annotations__"]:
                    delattr(obj, name)
            for name, value in before.items():
                if vars(obj).get(name, _MISSING) is not value and name not in ("__dict__", "__weakref__", "__doc__"):
                    setattr(obj, name, value)


_MISSING = object()


class _InterpretedLaunch:
    """kernel[grid](...) for CPU tensors: the interpreted twin, inside _interpreting()."""

    def __init__(self, kernel: Any) -> None:
        self.twin = _twin(kernel)

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def run(*args: Any, **kwargs: Any) -> None:
            with _interpreting():
                self.twin[grid](*args, **kwargs)

        return run


def launcher(kernel: Any, device: torch.device) -> Any:
    """The kernel as compiled for CUDA, or its interpreted twin for CPU tensors."""
    if device.type == "cuda":
        return kernel
    return _InterpretedLaunch(kernel)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1): block shapes in Triton must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (how many programs run at once)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs take exact (IEEE) products: the default TF32 keeps 10 mantissa bits,
    which would make fp32 disagree with the reference. Half types ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
