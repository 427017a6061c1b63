"""The `kvsqueeze` commands: each parses its options, calls the library, and turns
bad input (ValueError, KVSqueezeError) into one `error:` line and exit code 2."""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from kvsqueeze import __version__
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policy import policy_names

# Flags get metavar="": typer would show them as taking a <bool> value, which they do not.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Per-head KV-cache compression for LLMs.",
)


class Device(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class Pooling(StrEnum):
    avg = "avg"
    max = "max"
    none = "none"


class Dtype(StrEnum):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


# Token counts past 2**31 overflow torch's index math, and no model has such a context.
MAX_TOKENS = 2**31 - 1
MODEL_HELP = (
    "smollm2-135m, tiny-random-{llama,qwen2,mistral}, random:{llama-3.1-8b,mistral-7b,qwen2.5-7b,smollm2-135m} "
    "(random weights, real shapes) or a local model folder"
)
ModelOption = Annotated[str, typer.Option("--model", help=MODEL_HELP)]
KeepOption = Annotated[float | None, typer.Option("--keep", help="keep ratio in (0, 1]")]
TokensOption = Annotated[int | None, typer.Option("--tokens", help="tokens kept per head")]
WindowOption = Annotated[
    int, typer.Option("--window", max=MAX_TOKENS, help="observation window / always-kept recent tokens")
]
AlphaOption = Annotated[
    float, typer.Option("--alpha", help="Ada-KV safeguard: each head keeps >= window + alpha x (budget - window)")
]
DeviceOption = Annotated[Device, typer.Option("--device", help="where the model runs")]
PoolingOption = Annotated[
    Pooling | None,
    typer.Option("--pooling", help="how SnapKV-family scorers pool scores along the sequence (default: SnapKV's avg)"),
]
KernelOption = Annotated[
    int | None,
    typer.Option("--kernel", min=1, max=MAX_TOKENS, help="their pooling kernel, odd (default: SnapKV's 5)"),
]
AdaPoolKernelOption = Annotated[
    int,
    typer.Option(
        "--ada-pool-kernel",
        min=1,
        max=MAX_TOKENS,
        help="Ada-KV counts head shares on scores max-pooled with this odd kernel (1: the paper's plain rule)",
    ),
]
DtypeOption = Annotated[Dtype, typer.Option("--dtype", help="weights and KV cache dtype")]
POLICY_NAMES = ", ".join(policy_names())
PoliciesOption = Annotated[str, typer.Option("--policies", help=f"comma-separated policy names: {POLICY_NAMES}")]
QuestionAgnosticOption = Annotated[
    bool, typer.Option("--question-agnostic", metavar="", help="compress the context before the question is seen")
]
DEFAULT_POLICIES = "full,snapkv,ada-snapkv"
KvBitsOption = Annotated[
    int, typer.Option("--kv-bits", help="bits per stored K/V entry: 16 (as is), or 8, 4, 2 (KIVI quantization)")
]
KvGroupOption = Annotated[
    int,
    typer.Option(
        "--kv-group",
        help="quantization group: tokens per key group, channels per value group (at most head_dim); 256: the "
        "compact setting (int4 0.28 of bf16 at head_dim 64)",
    ),
]
KvResidualOption = Annotated[
    int, typer.Option("--kv-residual", help="newest decoded tokens per head kept in full precision (+ up to a group)")
]
KvKeyAxisOption = Annotated[
    str, typer.Option("--kv-key-axis", help="channel (KIVI) or token (the naive per-token baseline) for keys")
]
# Bounds that turn a mistyped number into an error instead of a run that never ends
# (samples) or an overflow deep in torch (seeds are 64-bit there).
MAX_SAMPLES = 100_000
MAX_SEED = 2**63 - 1

Command = TypeVar("Command", bound=Callable[..., None])


def fail(message: str) -> None:
    """One line on stderr, non-zero exit: what bad input gets."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def one_line_errors(command: Command) -> Command:
    """Bad input anywhere below a command (our KVSqueezeError, or the ValueError a
    policy or config raises on validation) ends the command with one `error:` line."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ValueError as err:
            fail(str(err))

    return run  # type: ignore[return-value]


def torch_dtype(dtype: Dtype):
    from kvsqueeze.hf.models import DTYPES

    return DTYPES[dtype.value]


def _pooling(pooling: Pooling | None, kernel: int | None, ada_pool_kernel: int) -> dict:
    """The scorer and Ada-KV pooling settings, as make_policy takes them."""
    return {"pooling": None if pooling is None else pooling.value, "kernel": kernel, "ada_pool_kernel": ada_pool_kernel}


def _policy(name: str, keep: float | None, tokens: int | None, window: int, alpha: float, pooling: dict):
    from kvsqueeze.policy import make_policy

    if keep is not None and tokens is not None:
        raise KVSqueezeError("give either --keep or --tokens, not both")
    return make_policy(name, keep=keep, tokens=tokens, window=window, alpha=alpha, **pooling)


def _quant(bits: int, group: int, residual: int, key_axis: str = "channel"):
    from kvsqueeze.store.quantized_kv import KVQuantConfig

    return KVQuantConfig(bits, group, residual, key_axis)  # type: ignore[arg-type]


def _policy_list(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names:
        raise KVSqueezeError(f"--policies names no policy; choose from {POLICY_NAMES}")
    return names


def _read_prompt(path: Path) -> str:
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise KVSqueezeError(f"prompt file {str(path)!r} {problem}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise KVSqueezeError(f"prompt file {str(path)!r} is not UTF-8 text") from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kvsqueeze {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", metavar="", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Per-head KV-cache compression for LLMs."""


@app.command()
@one_line_errors
def generate(
    model: ModelOption = "smollm2-135m",
    policy: Annotated[str, typer.Option("--policy", help=f"policy name: {POLICY_NAMES}")] = "full",
    keep: KeepOption = None,
    tokens: TokensOption = None,
    window: WindowOption = 32,
    alpha: AlphaOption = 0.2,
    pooling: PoolingOption = None,
    kernel: KernelOption = None,
    ada_pool_kernel: AdaPoolKernelOption = 7,
    prompt: Annotated[str | None, typer.Option("--prompt", help="prompt text (the context)")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="read the prompt from a file")] = None,
    question: Annotated[str | None, typer.Option("--question", help="question asked after the context")] = None,
    question_agnostic: QuestionAgnosticOption = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    chat: Annotated[
        bool, typer.Option("--chat/--no-chat", metavar="", help="wrap the prompt in the model's chat template")
    ] = False,
    device: DeviceOption = Device.cpu,
    dtype: DtypeOption = Dtype.fp32,
    kv_bits: KvBitsOption = 16,
    kv_group: KvGroupOption = 32,
    kv_residual: KvResidualOption = 128,
    kv_key_axis: KvKeyAxisOption = "channel",
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="print one JSON object")] = False,
) -> None:
    """Generate with a compressed KV cache and report its memory and speed."""
    pol = _policy(policy, keep, tokens, window, alpha, _pooling(pooling, kernel, ada_pool_kernel))
    quant = _quant(kv_bits, kv_group, kv_residual, kv_key_axis)
    if (prompt is None) == (prompt_file is None):
        raise KVSqueezeError("give exactly one of --prompt or --prompt-file")
    if prompt_file is not None:
        prompt = _read_prompt(prompt_file)
    from kvsqueeze.hf.generate import generate as run
    from kvsqueeze.hf.models import load_model

    mdl, tok = load_model(model, dtype=torch_dtype(dtype), device=device.value)
    result = run(
        mdl, tok, pol, prompt, question, not question_agnostic, max_new_tokens=max_new_tokens, chat=chat, quant=quant
    )
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    typer.echo(result.text)
    typer.echo(
        f"[{result.policy} {result.budget} {result.kv_quantization}] prompt {result.prompt_tokens} tok, "
        f"new {result.new_tokens} tok, KV {result.kv_bytes_stored / 2**20:.2f} MiB of "
        f"{result.kv_bytes_full / 2**20:.2f} MiB ({result.kv_bytes_stored / max(result.kv_bytes_full, 1):.1%}), "
        f"prefill {result.prefill_seconds:.2f} s, decode {result.decode_tokens_per_second:.1f} tok/s",
        err=True,
    )


@app.command()
@one_line_errors
def demo(
    model: ModelOption = "smollm2-135m",
    context: Annotated[int, typer.Option("--context", help="haystack length in tokens")] = 2000,
    keep: Annotated[float, typer.Option("--keep", help="keep ratio for the compressed policies")] = 0.25,
    device: DeviceOption = Device.cpu,
    dtype: DtypeOption = Dtype.fp32,
) -> None:
    """Needle in a haystack: full, streamingllm, snapkv and ada-snapkv side by side."""
    from kvsqueeze.cli.demo import run_demo

    run_demo(model, context, keep, device.value, torch_dtype(dtype))


@app.command()
@one_line_errors
def bench(
    model: ModelOption = "smollm2-135m",
    policies: PoliciesOption = DEFAULT_POLICIES,
    keep: KeepOption = None,
    tokens: TokensOption = None,
    context: Annotated[int, typer.Option("--context", help="prompt tokens per sequence")] = 4000,
    batch: Annotated[int, typer.Option("--batch", help="sequences decoded together")] = 1,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="decode steps timed")] = 32,
    pooling: PoolingOption = None,
    kernel: KernelOption = None,
    ada_pool_kernel: AdaPoolKernelOption = 7,
    device: DeviceOption = Device.cpu,
    dtype: DtypeOption = Dtype.fp32,
    kv_bits: Annotated[
        str, typer.Option("--kv-bits", help="bits per stored K/V entry, comma-separated to compare: 16, 8, 4, 2")
    ] = "16",
    kv_group: KvGroupOption = 32,
    kv_residual: KvResidualOption = 128,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="print a JSON list of rows")] = False,
) -> None:
    """Prefill and decode speed, memory and distance to the bandwidth bound, per policy
    and KV storage."""
    from kvsqueeze.bench.runner import run_bench
    from kvsqueeze.cli.progress import policy_progress

    if keep is not None and tokens is not None:
        raise KVSqueezeError("give either --keep or --tokens, not both")
    names = list(_policy_list(policies))
    quants = tuple(_quant(bits, kv_group, kv_residual) for bits in _numbers(kv_bits, int, "--kv-bits"))
    rows = run_bench(
        model,
        names,
        keep,
        tokens,
        context,
        batch,
        new_tokens,
        device.value,
        torch_dtype(dtype),
        policy_progress,
        quants,
        _pooling(pooling, kernel, ada_pool_kernel),
    )
    if as_json:
        typer.echo(json.dumps([row.to_json() for row in rows]))
        return
    from kvsqueeze.cli.tables import bench_table

    bench_table(rows, f"{model}, {device.value} {dtype.value}, batch {batch}, context {context}, {new_tokens} steps")


def _numbers(text: str | None, kind: type, option: str) -> tuple:
    if text is None:
        return ()
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise KVSqueezeError(f"{option} takes comma-separated numbers, got {text!r}") from None


def require_extra(extra: str, *modules: str) -> None:
    """Fail with the pip command when an optional extra's packages are missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise KVSqueezeError(
            f"this needs the [{extra}] extra ({', '.join(missing)} missing): pip install 'kvsqueeze[{extra}]'"
        )


@app.command("eval")
@one_line_errors
def evaluate(
    model: ModelOption = "smollm2-135m",
    task: Annotated[str, typer.Option("--task", help="needle, ruler, ppl or longbench")] = "needle",
    policies: PoliciesOption = DEFAULT_POLICIES,
    keep: Annotated[str | None, typer.Option("--keep", help="keep ratios, e.g. 0.1,0.2")] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="tokens per head, e.g. 128,256")] = None,
    lengths: Annotated[str | None, typer.Option("--lengths", help="prompt lengths in tokens")] = None,
    depths: Annotated[str, typer.Option("--depths", help="needle depths in [0, 1]")] = "0.1,0.5,0.9",
    samples: Annotated[
        int, typer.Option("--samples", min=1, max=MAX_SAMPLES, help="samples per cell (per dataset for longbench)")
    ] = 1,
    seed: Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED)] = 0,
    question_agnostic: QuestionAgnosticOption = False,
    data: Annotated[Path | None, typer.Option("--data", help="LongBench-format JSONL file")] = None,
    ray: Annotated[
        str | None, typer.Option("--ray", help="run on Ray: bare --ray starts it locally, or give ADDRESS")
    ] = None,
    window: WindowOption = 32,
    alpha: AlphaOption = 0.2,
    pooling: PoolingOption = None,
    kernel: KernelOption = None,
    ada_pool_kernel: AdaPoolKernelOption = 7,
    dtype: DtypeOption = Dtype.fp32,
    device: DeviceOption = Device.cpu,
    kv_bits: KvBitsOption = 16,
    kv_group: KvGroupOption = 32,
    kv_residual: KvResidualOption = 128,
    kv_key_axis: KvKeyAxisOption = "channel",
    out: Annotated[Path, typer.Option("--out", help="folder for results.jsonl, summary.md and plots")] = Path(
        "eval-results"
    ),
) -> None:
    """Score policies x budgets x lengths on a task; resumable; writes JSONL, markdown and plots."""
    require_extra("eval", "matplotlib", "rapidfuzz", "rouge_score")
    if ray is not None:
        require_extra("ray", "ray")
    from kvsqueeze.eval.config import EvalConfig
    from kvsqueeze.eval.runner import run_eval
    from kvsqueeze.hf.models import check_device

    check_device(device.value)
    config = EvalConfig(
        model=model,
        task=task,
        policies=_policy_list(policies),
        out=out,
        keeps=_numbers(keep, float, "--keep"),
        tokens=_numbers(tokens, int, "--tokens"),
        lengths=_numbers(lengths, int, "--lengths"),
        depths=_numbers(depths, float, "--depths"),
        samples=samples,
        seed=seed,
        question_agnostic=question_agnostic,
        data=data,
        window=window,
        alpha=alpha,
        **_pooling(pooling, kernel, ada_pool_kernel),
        dtype=str(torch_dtype(dtype)).removeprefix("torch."),
        device=device.value,
        kv_bits=kv_bits,
        kv_group=kv_group,
        kv_residual=kv_residual,
        kv_key_axis=kv_key_axis,
    )
    results = run_eval(config, ray_address=ray)
    typer.echo(f"wrote {results}, {out / 'summary.md'} and plots in {out}")
