"""What the engine's compression modes cost in quality and buy in peak KV, on the
needle task with the embedded model (SmolLM2-135M):

- after-prefill: the whole prompt (context + question) is compressed once, at its end;
- per-chunk: every prefill chunk is compressed as soon as it has run (--compress-chunks),
  so earlier chunks are scored without the question;
- shared-prefix: the context is a shared prefix, compressed alone (question-agnostic),
  and the question is appended to it: what "compress a document once, ask many
  questions" gives.

Each sample runs alone on a fresh engine state, so the peak KV is one sequence's.
Writes summary.md, results.json and modes.png under --out.

    .venv/bin/python benchmarks/engine_compression_modes.py --lengths 2048,4096 --samples 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from kvsqueeze.engine.llm import LLM  # noqa: E402
from kvsqueeze.engine.sampling_params import SamplingParams  # noqa: E402
from kvsqueeze.eval.metrics import score  # noqa: E402
from kvsqueeze.eval.prompt import PromptFormat  # noqa: E402
from kvsqueeze.eval.tasks import get_task  # noqa: E402
from kvsqueeze.eval.tasks.base import TaskRequest  # noqa: E402
from kvsqueeze.hf.models import model_folder  # noqa: E402

MODES = ("after-prefill", "per-chunk", "shared-prefix")


def run(args: argparse.Namespace, partial: Path) -> list[dict]:
    """Every (policy, mode, sample); rows are also written to `partial` as they come."""
    folder = model_folder(args.model)
    fmt = PromptFormat(AutoTokenizer.from_pretrained(folder))
    lengths = tuple(int(n) for n in args.lengths.split(","))
    depths = tuple(float(d) for d in args.depths.split(","))
    samples = list(get_task("needle").samples(fmt, TaskRequest(lengths, depths, args.samples, args.seed)))
    rows = []
    jobs = [(p, m) for p in args.policies.split(",") for m in MODES]
    with tqdm(total=len(jobs) * len(samples), desc="engine modes") as bar:
        for policy, mode in jobs:
            llm = LLM(
                str(folder), policy=policy, keep=args.keep, window=args.window, dtype=args.dtype,
                max_num_batched_tokens=args.chunk, compress_chunks=mode == "per-chunk", kv_memory=args.kv_memory,
            )  # fmt: skip
            engine = llm.engine
            for sample in samples:
                context, question = fmt.encode(sample.context, sample.question, sample.answer_prefix)
                params = SamplingParams(temperature=0.0, max_tokens=sample.max_new_tokens)
                engine.peak_stored_bytes = 0
                if mode == "shared-prefix":
                    out = llm.generate([question], params, use_tqdm=False, prefix=context)[0]
                    engine.blocks.prefixes.clear()
                else:
                    out = llm.generate([context + question], params, use_tqdm=False)[0]
                text = out.outputs[0].text
                rows.append({
                    "policy": policy, "mode": mode, "length": sample.length, "depth": sample.depth,
                    "index": sample.index, "keep": args.keep, "chunk": args.chunk, "answer": sample.answers[0],
                    "prediction": text, "score": score(sample.metric, text, sample.answers),
                    "peak_kv_bytes": engine.peak_stored_bytes, "prompt_tokens": len(context) + len(question),
                })  # fmt: skip
                partial.write_text(json.dumps(rows, indent=1))
                bar.update(1)
    return rows


def summarize(rows: list[dict], out: Path) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["length"], r["mode"]), []).append(r)
    lines = [
        "| policy | length | mode | samples | mean score | mean peak KV (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for (policy, length, mode), rs in sorted(groups.items()):
        mean = sum(r["score"] for r in rs) / len(rs)
        peak = sum(r["peak_kv_bytes"] for r in rs) / len(rs) / 2**20
        lines.append(f"| {policy} | {length} | {mode} | {len(rs)} | {mean:.2f} | {peak:.1f} |")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{p}\n{n}" for p, n, m in sorted(groups) if m == MODES[0]]
    for ax, key, title in ((axes[0], "score", "needle score"), (axes[1], "peak_kv_bytes", "peak KV (MiB)")):
        for i, mode in enumerate(MODES):
            values = [
                sum(r[key] for r in rs) / len(rs) / (2**20 if key == "peak_kv_bytes" else 1)
                for (p, n, m), rs in sorted(groups.items())
                if m == mode
            ]
            ax.bar([x + 0.27 * i for x in range(len(values))], values, width=0.27, label=mode)
        ax.set_xticks([x + 0.27 for x in range(len(labels))], labels, fontsize=8)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "modes.png", dpi=120)
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--policies", default="snapkv,ada-snapkv")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=512, help="prefill chunk (max_num_batched_tokens)")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--kv-memory", default="1GiB")
    parser.add_argument("--out", type=Path, default=Path("docs/results/engine_compression_modes"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = run(args, args.out / "results.json")
    table = summarize(rows, args.out)
    (args.out / "summary.md").write_text(
        f"# Engine compression modes: needle, {args.model}, keep {args.keep}, chunk {args.chunk}\n\n"
        f"Command: `.venv/bin/python benchmarks/engine_compression_modes.py --policies {args.policies} "
        f"--keep {args.keep} --lengths {args.lengths} --depths {args.depths} --samples {args.samples} "
        f"--chunk {args.chunk}`\n\n" + table + "\n![modes](modes.png)\n"
    )
    print(table)


if __name__ == "__main__":
    main()
