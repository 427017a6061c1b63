"""Triton kernels (ops/triton_*.py) against the torch references.

On CPU the kernels run under Triton's interpreter: a kernel launched on CPU tensors
runs its interpreted twin (ops/_triton.py), in this process, without TRITON_INTERPRET
(which would have to be set before anything imports triton, and would turn every
later GPU kernel into an interpreted one). Shapes are tiny and blocks small so that
ragged heads span several blocks and chunks. bf16 is not checked on CPU: tl.dot in
bf16 is wrong in the interpreter. The kernels are also compiled for an H100 (sm_90)
with Triton's own compiler, which needs no GPU. The tests at the end run on CUDA
only, at realistic shapes, in bf16 and fp16.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kvsqueeze.ops import (  # noqa: E402
    _triton,
    append_tokens,
    compact,
    keep_from_indices,
    policy_scores,
    ragged_attention,
    ragged_attention_reference,
    triton_append,
    triton_compact,
    triton_decode,
    triton_snapkv,
)
from kvsqueeze.policy.score import ScoreInput, SnapKVScorer  # noqa: E402
from kvsqueeze.store import FlatKV  # noqa: E402


@triton.jit
def _probe(x_ptr, n):
    for i in range(n):
        tl.store(x_ptr + i, i)


def interpreter_runs_kernels() -> bool:
    """Whether this triton's interpreter runs loops over runtime bounds (triton 3.6's
    fails with numpy 2.4); the CPU checks need it, the compiled kernels do not."""
    x = torch.zeros(2, dtype=torch.int32)
    try:
        _triton.launcher(_probe, x.device)[(1,)](x, 2)
    except Exception:
        return False
    return x.tolist() == [0, 1]


interpreted = pytest.mark.skipif(
    not interpreter_runs_kernels(), reason=f"triton {triton.__version__}'s interpreter cannot run the kernels on CPU"
)
D = 64
SCALE = D**-0.5
LENGTHS = [0, 5, 37, 100, 16, 1]  # an empty head, one-entry head, none a multiple of the blocks
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}
CUDA = torch.cuda.is_available()


def make_store(lengths: list[int], t: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> FlatKV:
    """Each head keeps the given number of random positions out of t."""
    gen = torch.Generator().manual_seed(seed)
    h = len(lengths)
    keys = torch.randn(h, t, D, generator=gen)
    values = torch.randn(h, t, D, generator=gen)
    keep = torch.zeros(h, t, dtype=torch.bool)
    for i, n in enumerate(lengths):
        keep[i, torch.randperm(t, generator=gen)[:n]] = True
    return FlatKV.from_dense(keys.to(device, dtype), values.to(device, dtype), keep.to(device))


def clone(kv: FlatKV, dtype: torch.dtype | None = None) -> FlatKV:
    dtype = dtype or kv.keys.dtype
    return FlatKV(
        kv.keys.to(dtype, copy=True),
        kv.values.to(dtype, copy=True),
        kv.positions.clone(),
        kv.lengths.clone(),
        kv.capacity.clone(),
    )


def with_slack(kv: FlatKV, gen: torch.Generator, steps: int = 3) -> FlatKV:
    """Grow kv by a few appends so that every head has free slots after its run
    (empty heads stay empty)."""
    end = int(kv.positions.max()) + 1 if kv.num_tokens else 0
    nonempty = (kv.lengths > 0)[:, None]
    for step in range(steps):
        h = kv.num_heads
        kv.append(
            torch.randn(h, 1, D, generator=gen).to(kv.keys.dtype),
            torch.randn(h, 1, D, generator=gen).to(kv.keys.dtype),
            torch.tensor([end + step]),
            valid=nonempty,
        )
    return kv


# ------------------------------------------------------------------ decode attention
@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_decode_matches_reference(dtype, group):
    gen = torch.Generator().manual_seed(group)
    kv = with_slack(make_store(LENGTHS, 120, dtype, seed=group), gen)
    h = kv.num_heads
    query = torch.randn(h, group, 1, D, generator=gen).to(dtype)
    q_pos = torch.full((h, 1), 200)
    expected = ragged_attention_reference(query.float(), clone(kv, torch.float32), q_pos, SCALE)
    # Blocks of 16 and chunks of 32: the 100-entry head is 4 chunks, the last one ragged.
    got = triton_decode.ragged_decode_attention(query, kv, SCALE, q_pos, block_n=16, chunk_size=32)
    assert got.shape == query.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, **TOL[dtype])
    assert bool((got[0] == 0).all()), "an empty head attends to nothing: zeros"
    unmasked = triton_decode.ragged_decode_attention(query, kv, SCALE, None, block_n=16, chunk_size=32)
    torch.testing.assert_close(unmasked, got)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_masks_by_position_and_window(dtype):
    gen = torch.Generator().manual_seed(7)
    kv = make_store([30, 90, 57, 0], 100, dtype, seed=7)
    query = torch.randn(4, 3, 1, D, generator=gen).to(dtype)
    first_of_head2 = int(kv.head(2)[2].min())
    q_pos = torch.tensor([[99], [60], [first_of_head2 - 1], [99]])  # head 2's query sees nothing
    ref_kv = clone(kv, torch.float32)
    for window in (None, 8, 40):
        expected = ragged_attention_reference(query.float(), ref_kv, q_pos, SCALE, window)
        got = triton_decode.ragged_decode_attention(query, kv, SCALE, q_pos, window, block_n=16, chunk_size=48)
        torch.testing.assert_close(got.float(), expected, **TOL[dtype])
        assert bool((got[2] == 0).all())


@interpreted
def test_decode_default_launch_and_strided_query():
    """Default block and chunk sizes, and a query that is a non-contiguous view."""
    gen = torch.Generator().manual_seed(3)
    kv = make_store([70, 0, 140], 150, torch.float32, seed=3)
    wide = torch.randn(3, 1, 2, D, generator=gen).transpose(1, 2)  # [3, 2, 1, D] with odd strides
    q_pos = torch.full((3, 1), 150)
    expected = ragged_attention_reference(wide.contiguous(), kv, q_pos, SCALE)
    torch.testing.assert_close(
        triton_decode.ragged_decode_attention(wide, kv, SCALE, q_pos), expected, **TOL[torch.float32]
    )


def test_decode_rejects_what_it_does_not_serve():
    kv = make_store([3], 4, torch.float32)
    with pytest.raises(ValueError, match="one query"):
        triton_decode.ragged_decode_attention(torch.randn(1, 1, 2, D), kv, SCALE, torch.full((1, 2), 5))
    with pytest.raises(ValueError, match="sliding window"):
        triton_decode.ragged_decode_attention(torch.randn(1, 1, 1, D), kv, SCALE, None, 4)


# ------------------------------------------------------------------ append
@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q", [1, 3])
def test_append_matches_store_append(dtype, q):
    gen = torch.Generator().manual_seed(q)
    kv = with_slack(make_store(LENGTHS, 50, dtype, seed=q), gen, steps=1)  # 16+ free slots per head
    expected = clone(kv)
    h = kv.num_heads
    for step in range(3):
        keys, values = torch.randn(h, q, D, generator=gen), torch.randn(h, q, D, generator=gen)  # fp32 in
        positions = 60 + q * step + torch.arange(q)
        valid = torch.rand(h, q, generator=gen) < 0.7 if step else None
        expected.append(keys, values, positions, valid)
        triton_append.append_tokens_triton(
            kv.keys, kv.values, kv.positions, kv.starts, kv.lengths, keys, values, positions, valid
        )
        assert torch.equal(kv.lengths, expected.lengths)
        assert torch.equal(kv.positions, expected.positions), "positions, and -1 on every free slot"
        assert torch.equal(kv.keys, expected.keys) and torch.equal(kv.values, expected.values)


@interpreted
def test_append_per_head_positions_and_dispatcher():
    gen = torch.Generator().manual_seed(9)
    kv = with_slack(make_store([4, 0, 9], 12, torch.float32, seed=9), gen, steps=1)
    by_torch = clone(kv)
    keys, values = torch.randn(3, 2, D, generator=gen), torch.randn(3, 2, D, generator=gen)
    positions = torch.tensor([[20, 21], [30, 31], [40, 41]])
    valid = torch.tensor([[True, False], [False, False], [True, True]])
    triton_append.append_tokens_triton(
        kv.keys, kv.values, kv.positions, kv.starts, kv.lengths, keys, values, positions, valid
    )
    append_tokens(by_torch, keys, values, positions, valid)  # CPU: the torch path
    assert kv.lengths.tolist() == [6, 0, 12]
    for a, b in zip(
        (kv.keys, kv.values, kv.positions, kv.lengths),
        (by_torch.keys, by_torch.values, by_torch.positions, by_torch.lengths),
        strict=True,
    ):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ compaction
@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_compact_matches_store_compact(dtype):
    gen = torch.Generator().manual_seed(5)
    kv = with_slack(make_store(LENGTHS, 120, dtype, seed=5), gen)
    keep = torch.rand(kv.keys.shape[0], generator=gen) < 0.4
    expected = clone(kv)
    expected.compact(keep)
    got = triton_compact.compact_triton(kv, keep)
    for name in ("keys", "values", "positions", "lengths", "capacity"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert torch.equal(compact(kv, keep).keys, expected.keys), "torch path agrees"


@interpreted
@pytest.mark.parametrize("slack", [3, "per-head"])
def test_compact_with_slack_and_indices(slack):
    gen = torch.Generator().manual_seed(6)
    kv = with_slack(make_store(LENGTHS, 120, torch.float16, seed=6), gen)
    if slack == "per-head":
        slack = torch.arange(kv.num_heads) * 2
    # Keep every other live entry of each head, given as per-head indices (-1 pads).
    indices = torch.full((kv.num_heads, 60), -1)
    for h, n in enumerate(kv.lengths.tolist()):
        indices[h, : (n + 1) // 2] = torch.arange(0, n, 2)
    keep = keep_from_indices(kv, indices)
    got = triton_compact.compact_triton(kv, keep, slack)
    by_torch = compact(kv, keep, slack)
    assert torch.equal(got.capacity, got.lengths + slack) and torch.equal(by_torch.capacity, got.capacity)
    assert torch.equal(got.positions, by_torch.positions), "same layout, -1 on the slack"
    for h in range(kv.num_heads):
        k, v, p = kv.head(h)
        for new, old in zip(got.head(h), (k[::2], v[::2], p[::2]), strict=True):
            assert torch.equal(new, old)
        for new, old in zip(by_torch.head(h), (k[::2], v[::2], p[::2]), strict=True):
            assert torch.equal(new, old)
    if isinstance(slack, int):  # every head has free slots: the next append writes in place
        before = got.keys.data_ptr()
        got.append(torch.randn(kv.num_heads, 1, D).half(), torch.randn(kv.num_heads, 1, D).half(), torch.tensor([999]))
        assert got.keys.data_ptr() == before
        assert torch.equal(got.lengths, by_torch.lengths + 1)


# ------------------------------------------------------------------ SnapKV scoring
def snapkv_case(group: int, window: int, t: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    b, hkv = 2, 2
    queries = torch.randn(b, hkv * group, t, D, generator=gen).to(dtype)
    keys = torch.randn(b, hkv, t, D, generator=gen).to(dtype)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :9] = False  # left padding
    x = ScoreInput(queries, keys, keys, valid, SCALE, window)
    oracle = ScoreInput(queries.float(), keys.float(), keys.float(), valid, SCALE, window)
    return x, oracle


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("group", "window", "t"), [(1, 8, 50), (3, 5, 77), (4, 16, 40), (4, 64, 37)])
def test_snapkv_matches_policy_scorer(dtype, group, window, t):
    x, oracle = snapkv_case(group, window, t, dtype, seed=group)
    for scorer in (SnapKVScorer(), SnapKVScorer(group_reduce="max")):
        expected = scorer(oracle)
        got = triton_snapkv.snapkv_scores_for(scorer, x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@interpreted
def test_snapkv_chunked_sums_and_dispatcher():
    x, oracle = snapkv_case(3, 12, 70, torch.float32, seed=11)
    from kvsqueeze.policy.score.base import attention_probs

    expected = attention_probs(oracle, 70 - 12, 70).sum(dim=3).flatten(1, 2)
    got = triton_snapkv.window_attention_sums(x.queries, x.keys, x.valid, SCALE, 12, chunk=16)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert bool((got[1, :, :9] == 0).all()), "padding keys get no attention"
    assert torch.equal(policy_scores(SnapKVScorer(), x), SnapKVScorer()(x)), "CPU: the policy's own scorer"
    assert triton_snapkv.supports(x.queries, 500), "a window longer than the prompt is the whole prompt"
    assert not triton_snapkv.supports(x.queries, 0)
    assert not triton_snapkv.supports(torch.zeros(1, 1, 200, D), triton_snapkv.MAX_WINDOW + 1)


# ------------------------------------------------------------------ dispatch and harness
def test_cpu_dispatch_never_takes_triton():
    kv = make_store([3, 5], 8, torch.float32)
    assert not _triton.use_triton(kv.keys)
    query = torch.randn(2, 2, 1, D)
    q_pos = torch.full((2, 1), 8)
    assert torch.equal(ragged_attention(query, kv, q_pos, SCALE), ragged_attention_reference(query, kv, q_pos, SCALE))


@interpreted
def test_interpreter_leaves_triton_language_as_it_was():
    """A CPU launch patches triton.language while it runs; afterwards nothing may be left
    changed, or GPU kernels compiled later in this process would break."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    watched = [JITFunction, tl, tl.core, tl.math, tl.standard, tl.core.tensor, tl.core.dtype]
    before = [dict(vars(obj)) for obj in watched]
    triton_decode.ragged_decode_attention(
        torch.randn(2, 2, 1, D), make_store([3, 5], 8, torch.float32), SCALE, torch.full((2, 1), 8)
    )
    for obj, saved in zip(watched, before, strict=True):
        changed = [name for name, value in saved.items() if vars(obj).get(name) is not value]
        assert not [n for n in changed if n not in ("__dict__", "__weakref__", "__doc__")], obj


# ------------------------------------------------------------------ compiled for sm_90
class Recorder:
    """Stands in for _triton.launcher: records each launch instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple[object, tuple, dict]] = []

    def __call__(self, kernel, device):
        recorder = self

        class Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, args, kwargs))

        return Launch()


TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}
TYPES |= {torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}


def compile_for_h100(kernel, args: tuple, kwargs: dict):
    """Compile one recorded launch to a cubin for sm_90, as the JIT would on an H100."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(kernel.arg_names[: len(args)], args, strict=True)) | kwargs
    assert set(values) == set(kernel.arg_names), "every argument was recorded"
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params, strict=True)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
            aligned = value.data_ptr() % 16 == 0
        elif isinstance(value, float):
            signature[name], aligned = "fp32", False
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            aligned = value % 16 == 0
        if not param.is_constexpr and aligned:  # the JIT's specialization: lets loads vectorize
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels were made interpreted-only")
def test_kernels_compile_for_h100(monkeypatch):
    """The GPU build of every kernel, at Llama-3.1-8B shapes in bf16 (the interpreter
    cannot catch what only the compiler checks: types of loop-carried values, layouts)."""
    pytest.importorskip("triton.backends.nvidia")
    recorder = Recorder()
    for module in (triton_decode, triton_append, triton_compact, triton_snapkv):
        monkeypatch.setattr(module, "launcher", recorder)
    d, dtype = 128, torch.bfloat16
    kv = FlatKV.from_dense(
        torch.randn(2, 40, d, dtype=dtype), torch.randn(2, 40, d, dtype=dtype), torch.rand(2, 40) < 0.5
    )
    kv.append(torch.randn(2, 1, d, dtype=dtype), torch.randn(2, 1, d, dtype=dtype), torch.tensor([40]))
    query = torch.zeros(2, 4, 1, d, dtype=dtype)
    triton_decode.ragged_decode_attention(query, kv, d**-0.5, torch.full((2, 1), 41), 16)
    triton_append.append_tokens_triton(
        kv.keys, kv.values, kv.positions, kv.starts, kv.lengths,
        torch.zeros(2, 1, d, dtype=dtype), torch.zeros(2, 1, d, dtype=dtype), torch.tensor([41]),
        torch.ones(2, 1, dtype=torch.bool),
    )  # fmt: skip
    triton_compact.compact_triton(kv, kv.positions >= 5, 2)
    qs, ks = torch.zeros(1, 8, 20, d, dtype=dtype), torch.zeros(1, 2, 20, d, dtype=dtype)
    triton_snapkv.window_attention_sums(qs, ks, torch.ones(1, 20, dtype=torch.bool), d**-0.5, 16)
    compiled = {}
    for kernel, args, kwargs in recorder.launches:
        key = (kernel.fn.__name__, kwargs.get("STATS"))
        if key not in compiled:
            compiled[key] = compile_for_h100(kernel, args, dict(kwargs))
    assert len(compiled) == 6, sorted(compiled)
    for key, binary in compiled.items():
        assert binary.asm["cubin"], key


# ------------------------------------------------------------------ on a GPU
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
GPU_TOL = {torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def gpu_store(seqs: int, kv_heads: int, context: int, keep: float, dtype, seed: int = 0) -> FlatKV:
    """Ragged per-head lengths around keep * context, some heads empty, d = 128."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h = seqs * kv_heads
    lengths = (keep * context * (0.5 + torch.rand(h, generator=gen, device="cuda"))).long().clamp_max(context)
    lengths[::7] = 0
    total = int(lengths.sum())
    keys = torch.randn(total, 128, generator=gen, device="cuda").to(dtype)
    values = torch.randn(total, 128, generator=gen, device="cuda").to(dtype)
    positions = torch.cat([torch.arange(n, device="cuda") for n in lengths.tolist()]).to(torch.int32)
    return FlatKV(keys, values, positions, lengths, lengths.clone())


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_gpu_decode_matches_reference(dtype, group):
    kv = gpu_store(4, 8, 8192, 0.2, dtype)
    query = torch.randn(kv.num_heads, group, 1, 128, device="cuda").to(dtype)
    q_pos = torch.full((kv.num_heads, 1), 8192, device="cuda")
    expected = ragged_attention_reference(query.float(), clone(kv, torch.float32), q_pos, 128**-0.5)
    got = ragged_attention(query, kv, q_pos, 128**-0.5)  # the dispatcher takes the kernel
    torch.testing.assert_close(got.float(), expected, **GPU_TOL[dtype])
    windowed = ragged_attention(query, kv, q_pos, 128**-0.5, sliding_window=500)
    expected = ragged_attention_reference(query.float(), clone(kv, torch.float32), q_pos, 128**-0.5, 500)
    torch.testing.assert_close(windowed.float(), expected, **GPU_TOL[dtype])


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_append_and_compact_match_store(dtype):
    kv = gpu_store(2, 8, 4096, 0.2, dtype, seed=1)
    fresh = [torch.randn(kv.num_heads, 1, 128, device="cuda").to(dtype) for _ in range(2)]
    kv.append(*fresh, torch.tensor([5000], device="cuda"))  # a relayout that leaves free slots
    expected = clone(kv)
    new = [torch.randn(kv.num_heads, 1, 128, device="cuda").to(dtype) for _ in range(2)]
    expected.append(*new, torch.tensor([5001], device="cuda"))
    append_tokens(kv, *new, torch.tensor([5001], device="cuda"))
    for name in ("keys", "values", "positions", "lengths"):
        assert torch.equal(getattr(kv, name), getattr(expected, name)), name
    keep = torch.rand(kv.keys.shape[0], device="cuda") < 0.3
    got = compact(kv, keep)
    expected.compact(keep)
    for name in ("keys", "values", "positions", "lengths", "capacity"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_snapkv_matches_policy_scorer(dtype):
    b, hq, hkv, t = 2, 32, 8, 4096
    queries = torch.randn(b, hq, t, 128, device="cuda").to(dtype)
    keys = torch.randn(b, hkv, t, 128, device="cuda").to(dtype)
    valid = torch.ones(b, t, dtype=torch.bool, device="cuda")
    valid[1, :300] = False
    x = ScoreInput(queries, keys, keys, valid, 128**-0.5, 32)
    expected = SnapKVScorer()(ScoreInput(queries.float(), keys.float(), keys.float(), valid, 128**-0.5, 32))
    got = policy_scores(SnapKVScorer(), x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=2e-2)
