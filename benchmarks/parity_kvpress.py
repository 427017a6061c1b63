"""Parity with kvpress: the same prompts, model and hyperparameters through kvpress's
presses and through kvsqueeze's policies; per layer and kv head, the Jaccard overlap
of the kept token sets, and the teacher-forced log-probability of the answer under
each compressed cache.

kvpress 0.5.5 needs transformers < 5.3 and kvsqueeze needs >= 5.19, so kvpress runs
in its own venv, through benchmarks/parity_kvpress_peer.py. Install it once (torch
first and pinned: an unpinned torch pulls a multi-GB CUDA build):

    python3 -m venv /tmp/kvpress-venv
    /tmp/kvpress-venv/bin/pip install torch==2.13.0
    /tmp/kvpress-venv/bin/pip install kvpress==0.5.5 transformers==5.2.0

then, from the repository root:

    .venv/bin/python benchmarks/parity_kvpress.py [--samples 3] [--length 2048] [--keep 0.25]
        [--kvpress-python /tmp/kvpress-venv/bin/python] [--out docs/results/parity_kvpress]

Prompts: the eval's needle task (question-aware: the question is compressed with the
context), SmolLM2-135M in fp32. Both sides keep exactly kvpress's token count per head,
int(n x (1 - compression_ratio)), passed to kvsqueeze as a token budget. Writes
OUT/results.json (every figure, per sample) and OUT/summary.md (the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvsqueeze.eval.answer import token_logprobs
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.tasks import TaskRequest, get_task
from kvsqueeze.hf.cache import use_kvsqueeze_attention
from kvsqueeze.hf.models import load_model, model_folder
from kvsqueeze.hf.prefill import PrefillRecord, record_prefill
from kvsqueeze.policy import Policy, make_policy, policy_names

MODEL = "smollm2-135m"
STREAMING_SINKS = 4  # kvpress's StreamingLLMPress and ExpectedAttentionPress default, and kvsqueeze's
PYRAMID_BETA = 20


@dataclass(frozen=True)
class Hyper:
    """The hyperparameters both sides are given."""

    window: int = 64  # SnapKV's observation window (kvpress's default)
    kernel: int = 5  # SnapKV's pooling kernel (kvpress's default)
    alpha: float = 0.2  # Ada-KV's safeguard
    keep: float = 0.25


@dataclass(frozen=True)
class Method:
    """One method on both sides: kvpress's press (as the peer builds it) and our policy."""

    name: str
    press: dict
    ours: Callable[[int, Hyper], Policy]  # (tokens kept per head, hyperparameters) -> policy
    setting: str  # how the two were matched, for the table
    against: str | None = None  # compare with another method's kvpress run instead of running a press

    @property
    def kvpress_name(self) -> str:
        return self.against or self.name


def _snapkv_like(name: str, n: int, h: Hyper, **options) -> Policy:
    """kvpress's SnapKV scoring: average pooling with its kernel, each query head
    pooled, then the GQA group averaged (SnapKVPress.score's order, also inside AdaKVPress)."""
    return make_policy(
        name, tokens=n, window=h.window, pooling="avg", kernel=h.kernel, pool_order="pool-then-reduce", **options
    )


def methods(h: Hyper) -> list[Method]:
    ratio = 1.0 - h.keep
    snap = {"compression_ratio": ratio, "window": h.window, "kernel": h.kernel}
    found = [
        Method("full", {"press": "full"}, lambda n, h: make_policy("full"), "no compression"),
        Method(
            "knorm",
            {"press": "knorm", "compression_ratio": ratio},
            lambda n, h: make_policy("knorm", tokens=n, window=0),
            "window 0 (kvpress protects no recent token)",
        ),
        Method(
            "streamingllm",
            {"press": "streamingllm", "compression_ratio": ratio, "n_sink": STREAMING_SINKS},
            lambda n, h: make_policy("streamingllm", tokens=n, window=h.window),
            f"{STREAMING_SINKS} sinks",
        ),
        Method(
            "snapkv",
            {"press": "snapkv", **snap},
            lambda n, h: _snapkv_like("snapkv", n, h),
            f"window {h.window}, avg pool kernel {h.kernel}, pool then GQA mean",
        ),
        Method(
            "tova",
            {"press": "tova", "compression_ratio": ratio},
            lambda n, h: make_policy("tova", tokens=n, window=1),
            "window 1 (kvpress keeps the last token only)",
        ),
        Method(
            "h2o",
            {"press": "observed_attention", "compression_ratio": ratio},
            lambda n, h: make_policy("h2o", tokens=n, window=1),
            "kvpress ObservedAttentionPress (eager); window 1",
        ),
        Method(
            "ada-snapkv",
            {"press": "adakv-snapkv", "alpha": h.alpha, **snap},
            lambda n, h: _snapkv_like("ada-snapkv", n, h, alpha=h.alpha, safeguard="kvpress", ada_pool_kernel=1),
            f"as snapkv; alpha {h.alpha}, kvpress's safeguard, shares on unpooled scores",
        ),
        Method(
            "ada-snapkv (kvsqueeze defaults)",
            {},
            lambda n, h: make_policy("ada-snapkv", tokens=n, window=h.window, alpha=h.alpha),
            f"window {h.window}, alpha {h.alpha}; Ada-KV paper's safeguard, GQA mean then pool, "
            "shares on max-pooled scores (kernel 7); against kvpress's AdaKV(SnapKV)",
            against="ada-snapkv",
        ),
        Method(
            "pyramidkv",
            {"press": "pyramidkv", "beta": PYRAMID_BETA, **snap},
            lambda n, h: _snapkv_like("pyramidkv", n, h),
            f"as snapkv; beta {PYRAMID_BETA}",
        ),
    ]
    if "expected-attention" in policy_names():
        found.append(
            Method(
                "expected-attention",
                {"press": "expected_attention", "compression_ratio": ratio},
                lambda n, h: make_policy("expected-attention", tokens=n, window=0),
                f"each side's defaults; {STREAMING_SINKS} sinks, no window",
            )
        )
    return found


def needle_prompts(fmt: PromptFormat, length: int, samples: int, seed: int) -> list[dict]:
    """Question-aware needle prompts, as `kvsqueeze eval --task needle` builds them,
    at depths spread over the context."""
    depths = tuple(round((i + 1) / (samples + 1), 3) for i in range(samples))
    request = TaskRequest((length,), depths, 1, seed, None)
    prompts = []
    for sample in get_task("needle").samples(fmt, request):
        context_ids, question_ids = fmt.encode(sample.context, sample.question, sample.answer_prefix)
        prompts.append(
            {"prompt": context_ids + question_ids, "target": fmt.tokens(sample.target), "depth": sample.depth}
        )
    return prompts


def kept_tokens(n_tokens: int, keep: float) -> int:
    """kvpress's tokens kept per head at compression ratio 1 - keep (its ScorerPress rule)."""
    return max(1, int(n_tokens * (1.0 - (1.0 - keep))))


def run_kvpress(python: str, prompts: list[dict], job_methods: list[Method]) -> dict:
    """The peer's arrays: kept/<sample>/<name> and logprobs/<sample>/<name>."""
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.npz"
        job.write_text(
            json.dumps(
                {
                    "model_dir": str(model_folder(MODEL)),
                    "samples": [{"prompt": p["prompt"], "target": p["target"]} for p in prompts],
                    "methods": [{"name": m.name, **m.press} for m in job_methods if m.against is None],
                }
            )
        )
        peer = Path(__file__).with_name("parity_kvpress_peer.py")
        subprocess.run([python, str(peer), str(job), str(out)], check=True)  # its progress goes to stderr
        with np.load(out) as arrays:
            return {k: arrays[k] for k in arrays.files}


def run_ours(model, record: PrefillRecord, target: list[int], policy: Policy) -> tuple[np.ndarray, np.ndarray]:
    """(kept[layers, kv_heads, tokens] read back from the cache, answer token log-probs)."""
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        cache = record.cache(model, policy)
        tokens = record.layers[0].keys.shape[2]
        kept = np.zeros((len(cache.layers), model.config.num_key_value_heads, tokens), dtype=bool)
        for i, layer in enumerate(cache.layers):
            store = layer.compressed.store
            for head in range(store.num_heads):
                kept[i, head, store.head(head)[2].numpy()] = True
        logprobs = token_logprobs(model, cache, record.last_logits, target)
    return kept, logprobs.double().numpy()


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[layers, heads]: |A & B| / |A | B| of the kept sets."""
    return (a & b).sum(axis=-1) / np.maximum((a | b).sum(axis=-1), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--keep", type=float, default=Hyper.keep)
    parser.add_argument("--window", type=int, default=Hyper.window)
    parser.add_argument("--kernel", type=int, default=Hyper.kernel)
    parser.add_argument("--alpha", type=float, default=Hyper.alpha)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kvpress-python", default="/tmp/kvpress-venv/bin/python")
    parser.add_argument("--out", type=Path, default=Path("docs/results/parity_kvpress"))
    parser.add_argument(
        "--methods",
        default="",
        help="comma-separated subset to (re)run; rows of the others are kept from OUT/results.json",
    )
    parser.add_argument(
        "--from-results", action="store_true", help="only rewrite OUT/summary.md from OUT/results.json (and notes.md)"
    )
    args = parser.parse_args()
    if args.from_results:
        saved = json.loads((args.out / "results.json").read_text())
        write_summary(args.out, saved["run"], saved["summary"])
        return
    if not 0.0 < args.keep < 1.0:
        sys.exit(f"--keep must be in (0, 1), got {args.keep}")
    if not Path(args.kvpress_python).is_file():
        sys.exit(f"{args.kvpress_python} does not exist: install kvpress's venv as this script's docstring says")
    hyper = Hyper(window=args.window, kernel=args.kernel, alpha=args.alpha, keep=args.keep)
    torch.manual_seed(0)
    model, tokenizer = load_model(MODEL)
    prompts = needle_prompts(PromptFormat(tokenizer), args.length, args.samples, args.seed)
    everything = methods(hyper)
    wanted = [m for m in args.methods.split(",") if m]
    unknown = set(wanted) - {m.name for m in everything}
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}: choose from {', '.join(m.name for m in everything)}")
    job_methods = [m for m in everything if not wanted or m.name in wanted]
    # A method compared against another's kvpress run needs that run too.
    needed = {m.kvpress_name for m in job_methods}
    peer_methods = [m for m in everything if m.against is None and m.name in needed]
    theirs = run_kvpress(args.kvpress_python, prompts, peer_methods)

    from rich.progress import track

    per_sample = []
    records = {}
    steps = [(s, p, m) for s, p in enumerate(prompts) for m in job_methods]
    for s, prompt, method in track(steps, description="kvsqueeze"):
        if s not in records:  # one prefill per prompt, compressed by every method (as the eval does)
            records = {s: record_prefill(model, torch.tensor([prompt["prompt"]]))}
        policy = method.ours(kept_tokens(len(prompt["prompt"]), hyper.keep), hyper)
        kept, logprobs = run_ours(model, records[s], prompt["target"], policy)
        their_kept = theirs[f"kept/{s}/{method.kvpress_name}"]
        their_logprobs = theirs[f"logprobs/{s}/{method.kvpress_name}"]
        overlap = jaccard(kept, their_kept)
        per_sample.append(
            {
                "method": method.name,
                "sample": s,
                "depth": prompt["depth"],
                "prompt_tokens": len(prompt["prompt"]),
                "kept_ours": int(kept.sum()),
                "kept_kvpress": int(their_kept.sum()),
                "jaccard_mean": float(overlap.mean()),
                "jaccard_min": float(overlap.min()),
                "jaccard_per_layer_head": overlap.round(4).tolist(),
                "kept_per_layer_ours": kept.sum(axis=(1, 2)).tolist(),
                "kept_per_layer_kvpress": their_kept.sum(axis=(1, 2)).tolist(),
                "logprob_ours": float(logprobs.mean()),
                "logprob_kvpress": float(their_logprobs.mean()),
            }
        )
    write_results(args.out, hyper, args, everything, per_sample)


def summarize(job_methods: list[Method], per_sample: list[dict]) -> list[dict]:
    rows = []
    for method in job_methods:
        mine = [r for r in per_sample if r["method"] == method.name]
        rows.append(
            {
                "method": method.name,
                "setting": method.setting,
                "jaccard_mean": float(np.mean([r["jaccard_mean"] for r in mine])),
                "jaccard_min": float(np.min([r["jaccard_min"] for r in mine])),
                "logprob_ours": float(np.mean([r["logprob_ours"] for r in mine])),
                "logprob_kvpress": float(np.mean([r["logprob_kvpress"] for r in mine])),
                "logprob_max_abs_diff": float(np.max([abs(r["logprob_ours"] - r["logprob_kvpress"]) for r in mine])),
            }
        )
    return rows


def write_results(out: Path, hyper: Hyper, args: argparse.Namespace, everything: list[Method], per_sample) -> None:
    """results.json and summary.md; rows of methods this run skipped are kept from an
    earlier results.json of the same run settings."""
    run = {
        "model": MODEL,
        "length": args.length,
        "samples": args.samples,
        "seed": args.seed,
        **dataclasses.asdict(hyper),
        "kvpress": "0.5.5",
    }
    ran = {r["method"] for r in per_sample}
    saved = out / "results.json"
    if saved.is_file():
        earlier = json.loads(saved.read_text())
        if earlier["run"] == run:
            per_sample = [r for r in earlier["per_sample"] if r["method"] not in ran] + per_sample
    present = {r["method"] for r in per_sample}
    rows = summarize([m for m in everything if m.name in present], per_sample)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"run": run, "summary": rows, "per_sample": per_sample}, indent=1))
    write_summary(out, run, rows)


def write_summary(out: Path, run: dict, rows: list[dict]) -> None:
    """summary.md: the table, then notes.md (the hand-written explanation of the
    remaining differences) when it exists."""
    n, length, keep = run["samples"], run["length"], run["keep"]
    lines = [
        "# Parity with kvpress 0.5.5",
        "",
        f"`benchmarks/parity_kvpress.py --samples {n} --length {length} --keep {keep}`: {run['model']} (fp32), "
        f"{n} question-aware needle prompts of about {length} tokens, keep {keep} (both sides keep kvpress's "
        f"int(n x {keep:g}) tokens per head). Jaccard: overlap of the kept token sets per layer and kv head "
        "(mean and min over layers, heads and prompts). Log-prob: mean per-token log-probability of the answer, "
        "teacher-forced, averaged over prompts; abs Δ max: the largest per-prompt difference.",
        "",
        "| method | matched as | Jaccard mean | Jaccard min | log-prob ours | log-prob kvpress | Δ (ours − kvpress) "
        "| abs Δ max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['jaccard_mean']:.4f} | {r['jaccard_min']:.4f} "
            f"| {r['logprob_ours']:.3f} | {r['logprob_kvpress']:.3f} | {r['logprob_ours'] - r['logprob_kvpress']:+.3f} "
            f"| {r['logprob_max_abs_diff']:.3f} |"
        )
    notes = out / "notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
