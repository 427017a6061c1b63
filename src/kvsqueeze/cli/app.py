"""The `kvsqueeze` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from kvsqueeze.errors import KVSqueezeError

try:  # recent typer vendors its own click
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Per-head KV-cache compression for LLMs.",
)

ModelOption = Annotated[str, typer.Option("--model", help="smollm2-135m, tiny-random-{llama,qwen2,mistral} or a path")]
KeepOption = Annotated[float | None, typer.Option("--keep", help="keep ratio in (0, 1]")]
TokensOption = Annotated[int | None, typer.Option("--tokens", help="tokens kept per head")]
WindowOption = Annotated[int, typer.Option("--window", help="observation window / always-kept recent tokens")]
AlphaOption = Annotated[float, typer.Option("--alpha", help="Ada-KV safeguard: each head keeps >= alpha x budget")]


def fail(message: str) -> None:
    """One line on stderr, non-zero exit: what bad input gets."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _policy(name: str, keep: float | None, tokens: int | None, window: int, alpha: float):
    from kvsqueeze.policy import make_policy

    if keep is not None and tokens is not None:
        raise KVSqueezeError("give either --keep or --tokens, not both")
    return make_policy(name, keep=keep, tokens=tokens, window=window, alpha=alpha)


@app.command()
def generate(
    model: ModelOption = "smollm2-135m",
    policy: Annotated[str, typer.Option("--policy", help="policy preset name")] = "full",
    keep: KeepOption = None,
    tokens: TokensOption = None,
    window: WindowOption = 32,
    alpha: AlphaOption = 0.2,
    prompt: Annotated[str | None, typer.Option("--prompt", help="prompt text (the context)")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="read the prompt from a file")] = None,
    question: Annotated[str | None, typer.Option("--question", help="question asked after the context")] = None,
    question_agnostic: Annotated[
        bool, typer.Option("--question-agnostic", help="compress the context before the question is seen")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens")] = 64,
    chat: Annotated[bool, typer.Option("--chat", help="wrap the prompt in the model's chat template")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Generate with a compressed KV cache and report its memory and speed."""
    try:
        pol = _policy(policy, keep, tokens, window, alpha)
        if (prompt is None) == (prompt_file is None):
            raise KVSqueezeError("give exactly one of --prompt or --prompt-file")
        if prompt_file is not None:
            if not prompt_file.is_file():
                problem = "is a folder, not a file" if prompt_file.is_dir() else "does not exist"
                raise KVSqueezeError(f"prompt file {str(prompt_file)!r} {problem}")
            prompt = prompt_file.read_text(encoding="utf-8")
        from kvsqueeze.generate import generate as run
        from kvsqueeze.hf.models import load_model

        mdl, tok = load_model(model)
        result = run(mdl, tok, pol, prompt, question, not question_agnostic, max_new_tokens=max_new_tokens, chat=chat)
    except ValueError as err:  # KVSqueezeError and the policy's own validation errors
        fail(str(err))
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    typer.echo(result.text)
    typer.echo(
        f"[{result.policy} {result.budget}] prompt {result.prompt_tokens} tok, new {result.new_tokens} tok, "
        f"KV {result.kv_bytes_stored / 2**20:.2f} MiB of {result.kv_bytes_full / 2**20:.2f} MiB, "
        f"prefill {result.prefill_seconds:.2f} s, decode {result.decode_tokens_per_second:.1f} tok/s",
        err=True,
    )


@app.command()
def demo(
    model: ModelOption = "smollm2-135m",
    context: Annotated[int, typer.Option("--context", help="haystack length in tokens")] = 2000,
    keep: Annotated[float, typer.Option("--keep", help="keep ratio for the compressed policies")] = 0.25,
) -> None:
    """Needle in a haystack: full, streamingllm, snapkv and ada-snapkv side by side."""
    from kvsqueeze.demo import run_demo

    try:
        run_demo(model, context, keep)
    except ValueError as err:  # KVSqueezeError and the policy's own validation errors
        fail(str(err))


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DEFAULT_BENCH = "full,snapkv,ada-snapkv"


@app.command()
def bench(
    model: ModelOption = "smollm2-135m",
    policies: Annotated[
        str, typer.Option("--policies", help="comma-separated policy names")
    ] = "full,snapkv,ada-snapkv",
    keep: KeepOption = None,
    tokens: TokensOption = None,
    context: Annotated[int, typer.Option("--context", help="prompt tokens per sequence")] = 4000,
    batch: Annotated[int, typer.Option("--batch", help="sequences decoded together")] = 1,
    new_tokens: Annotated[int, typer.Option("--new-tokens", help="decode steps timed")] = 32,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32")] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list of rows")] = False,
) -> None:
    """Prefill and decode speed, memory and distance to the bandwidth bound, per policy.
    MODEL may be random:<shape> (random weights, real shapes), e.g. random:llama-3.1-8b."""
    from kvsqueeze.bench import run_bench

    try:
        if keep is not None and tokens is not None:
            raise KVSqueezeError("give either --keep or --tokens, not both")
        if dtype not in DTYPES:
            raise KVSqueezeError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if device not in ("cpu", "cuda"):
            raise KVSqueezeError(f"unknown device {device!r}; choose cpu or cuda")
        names = [p.strip() for p in policies.split(",") if p.strip()]
        rows = run_bench(model, names, keep, tokens, context, batch, new_tokens, device, DTYPES[dtype])
    except ValueError as err:
        fail(str(err))
    if as_json:
        typer.echo(json.dumps([row.to_json() for row in rows]))
        return
    from kvsqueeze.bench import bench_table

    bench_table(rows, f"{model}, {device} {dtype}, batch {batch}, context {context}, {new_tokens} steps")


def _numbers(text: str | None, kind: type, option: str) -> tuple:
    if text is None:
        return ()
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise KVSqueezeError(f"{option} takes comma-separated numbers, got {text!r}") from None


@app.command("eval")
def evaluate(
    model: ModelOption = "smollm2-135m",
    task: Annotated[str, typer.Option("--task", help="needle, ruler, ppl or longbench")] = "needle",
    policies: Annotated[str, typer.Option("--policies", help="comma-separated policy names")] = DEFAULT_BENCH,
    keep: Annotated[str | None, typer.Option("--keep", help="keep ratios, e.g. 0.1,0.2")] = None,
    tokens: Annotated[str | None, typer.Option("--tokens", help="tokens per head, e.g. 128,256")] = None,
    lengths: Annotated[str | None, typer.Option("--lengths", help="prompt lengths in tokens")] = None,
    depths: Annotated[str, typer.Option("--depths", help="needle depths in [0, 1]")] = "0.1,0.5,0.9",
    samples: Annotated[int, typer.Option("--samples", help="samples per cell (per dataset for longbench)")] = 1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    question_agnostic: Annotated[
        bool, typer.Option("--question-agnostic", help="compress the context before the question is seen")
    ] = False,
    data: Annotated[Path | None, typer.Option("--data", help="LongBench-format JSONL file")] = None,
    ray: Annotated[
        str | None, typer.Option("--ray", help="run on Ray: bare --ray starts it locally, or give ADDRESS")
    ] = None,
    window: WindowOption = 32,
    alpha: AlphaOption = 0.2,
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32")] = "fp32",
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    out: Annotated[Path, typer.Option("--out", help="folder for results.jsonl, summary.md and plots")] = Path(
        "eval-results"
    ),
) -> None:
    """Score policies x budgets x lengths on a task; resumable; writes JSONL, markdown and plots."""
    from kvsqueeze.eval.config import EvalConfig
    from kvsqueeze.eval.runner import run_eval

    try:
        if dtype not in DTYPES:
            raise KVSqueezeError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        if device not in ("cpu", "cuda"):
            raise KVSqueezeError(f"unknown device {device!r}; choose cpu or cuda")
        config = EvalConfig(
            model=model,
            task=task,
            policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
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
            dtype=DTYPES[dtype],
            device=device,
        )
        results = run_eval(config, ray_address=ray)
    except ValueError as err:
        fail(str(err))
    typer.echo(f"wrote {results}, {out / 'summary.md'} and plots in {out}")


def with_bare_ray(argv: list[str]) -> list[str]:
    """`--ray` takes an optional ADDRESS: a bare `--ray` means a local Ray."""
    fixed = []
    for i, arg in enumerate(argv):
        fixed.append(arg)
        if arg == "--ray" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            fixed.append("local")
    return fixed


def main() -> None:
    # Usage errors (a mistyped option or value) get the same one-line form as bad input.
    try:
        code = app(args=with_bare_ray(sys.argv[1:]), standalone_mode=False)
    except UsageError as err:
        if err.format_message():  # empty when the help was shown for a bare `kvsqueeze`
            typer.echo(f"error: {err.format_message()}", err=True)
        code = 2
    except typer.Abort:
        code = 130
    sys.exit(code or 0)
