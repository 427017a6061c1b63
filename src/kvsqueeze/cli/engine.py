"""The serving engine's commands: `kvsqueeze serve` (OpenAI-compatible HTTP) and
`kvsqueeze bench-engine` (offline throughput, side by side with vLLM's CPU build)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kvsqueeze.cli.app import (
    DEFAULT_POLICIES,
    MAX_TOKENS,
    AlphaOption,
    Device,
    DeviceOption,
    Dtype,
    DtypeOption,
    KeepOption,
    KvBitsOption,
    KvGroupOption,
    KvResidualOption,
    ModelOption,
    PoliciesOption,
    TokensOption,
    WindowOption,
    _policy,
    _policy_list,
    _quant,
    app,
    one_line_errors,
    require_extra,
)
from kvsqueeze.engine.sequence import check_engine_policy
from kvsqueeze.errors import KVSqueezeError

KvMemoryOption = Annotated[str, typer.Option("--kv-memory", help="KV block pool size, e.g. 1GiB, 512MiB")]
CompressChunksOption = Annotated[
    bool,
    typer.Option(
        "--compress-chunks/--compress-after-prefill",
        help="compress each prompt chunk as it runs (bounded peak KV) or the whole prompt at its end",
    ),
]
MaxKvTokensOption = Annotated[
    int | None,
    typer.Option(
        "--max-kv-tokens", min=16, max=MAX_TOKENS, help="per-head cap while decoding: the policy evicts past it"
    ),
]
ReserveOption = Annotated[
    bool,
    typer.Option(
        "--reserve/--no-reserve",
        help="admit a request only when every running request's peak KV fits (no preemption within max_tokens); "
        "--no-reserve admits on the next prompt chunk alone (more at once, preemption by recompute)",
    ),
]


def _engine_quant(bits: int, group: int, residual: int, compress_chunks: bool):
    """The KV quantization flags, checked before any model loads (KVQuantConfig's errors
    for bad bits, group or residual; per-chunk compression does not combine with it)."""
    quant = _quant(bits, group, residual)
    if quant.quantizes and compress_chunks:
        raise KVSqueezeError("--compress-chunks is not supported with --kv-bits below 16")
    return quant


@app.command()
@one_line_errors
def serve(
    model: ModelOption = "smollm2-135m",
    policy: Annotated[str, typer.Option("--policy", help="default compression policy")] = "ada-snapkv",
    keep: KeepOption = None,
    tokens: TokensOption = None,
    window: WindowOption = 32,
    alpha: AlphaOption = 0.2,
    kv_memory: KvMemoryOption = "1GiB",
    max_kv_tokens: MaxKvTokensOption = None,
    compress_chunks: CompressChunksOption = False,
    reserve: ReserveOption = True,
    kv_bits: KvBitsOption = 16,
    kv_group: KvGroupOption = 32,
    kv_residual: KvResidualOption = 128,
    dtype: DtypeOption = Dtype.bf16,
    device: DeviceOption = Device.cpu,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option("--api-key", help="require 'Authorization: Bearer KEY'")] = None,
    max_num_seqs: Annotated[int, typer.Option("--max-num-seqs", min=1, max=65536)] = 256,
    max_num_batched_tokens: Annotated[int, typer.Option("--max-num-batched-tokens", min=1, max=MAX_TOKENS)] = 2048,
) -> None:
    """Serve an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics) on a paged, per-head compressed KV cache."""
    require_extra("serve", "fastapi", "uvicorn")
    import uvicorn

    from kvsqueeze.engine.async_engine import AsyncLLMEngine
    from kvsqueeze.engine.llm_engine import EngineArgs, LLMEngine, parse_bytes
    from kvsqueeze.engine.server import build_app
    from kvsqueeze.hf.models import check_device, model_folder

    check_device(device.value)
    # Bad names and budgets, and policies the engine cannot run, fail before the model loads.
    check_engine_policy(_policy(policy, keep, tokens, window, alpha, {}), compress_chunks)
    parse_bytes(kv_memory)
    _engine_quant(kv_bits, kv_group, kv_residual, compress_chunks)
    folder = model_folder(model)
    args = EngineArgs(
        model=str(folder), policy=policy, keep=keep, tokens=tokens, window=window, alpha=alpha,
        kv_memory=kv_memory, dtype=dtype.value, device=device.value, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_kv_tokens=max_kv_tokens, compress_chunks=compress_chunks,
        reserve=reserve, kv_bits=kv_bits, kv_group=kv_group, kv_residual=kv_residual,
    )  # fmt: skip
    engine = AsyncLLMEngine(LLMEngine(args))
    typer.echo(
        f"serving {model} with {policy} on http://{host}:{port}/v1 ({engine.engine.blocks.num_blocks} KV blocks)"
    )
    try:
        uvicorn.run(build_app(engine, model, api_key=api_key), host=host, port=port, log_level="warning")
    finally:
        engine.shutdown()


@app.command("bench-engine")
@one_line_errors
def bench_engine(
    model: ModelOption = "smollm2-135m",
    policies: PoliciesOption = DEFAULT_POLICIES,
    keep: KeepOption = None,
    tokens: TokensOption = None,
    window: WindowOption = 32,
    num_prompts: Annotated[int, typer.Option("--num-prompts", min=1, max=100_000)] = 32,
    prompt_len: Annotated[int, typer.Option("--prompt-len", min=1, max=MAX_TOKENS)] = 2048,
    output_len: Annotated[int, typer.Option("--output-len", min=1, max=MAX_TOKENS)] = 256,
    kv_memory: KvMemoryOption = "1GiB",
    compress_chunks: CompressChunksOption = False,
    reserve: ReserveOption = True,
    kv_bits: KvBitsOption = 16,
    kv_group: KvGroupOption = 32,
    kv_residual: KvResidualOption = 128,
    dtype: DtypeOption = Dtype.bf16,
    device: DeviceOption = Device.cpu,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="print a JSON list of rows")] = False,
) -> None:
    """Engine throughput per policy on N essay prompts of exactly L tokens, M tokens out
    each (greedy, ignore_eos): the workload of shared/bench/anchor_vllm_cpu.py."""
    from rich.console import Console

    from kvsqueeze.bench.engine import bench_engine as run
    from kvsqueeze.engine.llm_engine import parse_bytes
    from kvsqueeze.hf.models import check_device, model_folder

    if keep is not None and tokens is not None:
        raise KVSqueezeError("give either --keep or --tokens, not both")
    names = list(_policy_list(policies))
    for name in names:
        check_engine_policy(_policy(name, keep, tokens, window, 0.2, {}), compress_chunks)
    check_device(device.value)
    parse_bytes(kv_memory)
    quant = _engine_quant(kv_bits, kv_group, kv_residual, compress_chunks)
    console = Console(stderr=True)
    rows = run(
        model_folder(model), names, keep, tokens, num_prompts, prompt_len, output_len, kv_memory, dtype.value,
        device.value, window, on_policy=lambda name: console.print(f"[bold]policy {name}[/bold]"),
        compress_chunks=compress_chunks, reserve=reserve, kv_bits=kv_bits, kv_group=kv_group,
        kv_residual=kv_residual,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps([row.as_dict() for row in rows]))
        return
    from kvsqueeze.cli.tables import engine_bench_table

    title = (
        f"{model}, {device.value} {dtype.value}, {num_prompts} x {prompt_len} in, {output_len} out, KV {kv_memory}"
        f", {quant.describe()}"
    )
    engine_bench_table(rows, title)
