"""`kvsqueeze distill`: train a SwiftKV model (arXiv 2410.03960) from a Llama-architecture
model on the local essays, with a progress bar, resumable checkpoints and a curve PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvsqueeze.cli.app import Device, DeviceOption, ModelOption, app, one_line_errors
from kvsqueeze.errors import KVSqueezeError

MAX_TRAIN_TOKENS = 10**10


@app.command()
@one_line_errors
def distill(
    out: Annotated[Path, typer.Option("--out", help="output folder: checkpoints, curve, the trained model")],
    model: ModelOption = "smollm2-135m",
    kv_layer: Annotated[
        int | None, typer.Option("--kv-layer", help="first layer whose K/V come from its input (default: L/2)")
    ] = None,
    across_kv: Annotated[
        int, typer.Option("--across-kv", help="AcrossKV: adjacent layers sharing a cache (1, 2, 4)")
    ] = 1,
    tokens: Annotated[int, typer.Option("--tokens", min=1, max=MAX_TRAIN_TOKENS, help="training tokens")] = 100_000,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, max=8192, help="tokens per training sequence")] = 512,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="AdamW learning rate")] = 1e-3,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="distillation temperature")] = 2.0,
    eval_every: Annotated[
        int, typer.Option("--eval-every", min=1, max=MAX_TRAIN_TOKENS, help="held-out perplexity every N tokens")
    ] = 20_000,
    eval_tokens: Annotated[int, typer.Option("--eval-tokens", min=2, max=10**7, help="held-out tokens")] = 8192,
    device: DeviceOption = Device.cpu,
) -> None:
    """Distill a SwiftKV model: only the new K/V projection (+norm) trains, against the
    original model's logits. Rerun the same command to resume an interrupted run."""
    from kvsqueeze.hf.models import load_model
    from kvsqueeze.swiftkv.curve import plot_curve
    from kvsqueeze.swiftkv.distill import DistillConfig
    from kvsqueeze.swiftkv.distill import distill as run

    config = DistillConfig(
        kv_layer=kv_layer,
        across_group=across_kv,
        tokens=tokens,
        seq_len=seq_len,
        lr=lr,
        temperature=temperature,
        eval_every=eval_every,
        eval_tokens=eval_tokens,
    )
    if out.exists() and not out.is_dir():
        raise KVSqueezeError(f"--out {out} is a file, not a folder")
    teacher, tokenizer = load_model(model, device=device.value)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("distill", total=config.steps)

        def on_step(step: int, steps: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"distill loss {loss:.4f}")

        result = run(teacher, tokenizer, config, out, on_step)
    png = plot_curve(result.curve, result.teacher_ppl, out / "curve.png", f"SwiftKV distillation of {model}")
    evals = [p for p in result.curve if "held_out_ppl" in p]
    typer.echo(
        f"held-out perplexity: original {result.teacher_ppl:.3f}, SwiftKV {evals[0]['held_out_ppl']:.3f} before "
        f"-> {evals[-1]['held_out_ppl']:.3f} after {evals[-1]['tokens']} tokens; model in {out}, curve in {png}"
    )
