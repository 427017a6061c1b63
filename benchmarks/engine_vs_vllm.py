"""kvsqueeze's engine and vLLM's CPU build on the same workload, in one sitting.

Runs shared/bench/anchor_vllm_cpu.py (vLLM, in its own venv: see its docstring) and
`kvsqueeze bench-engine` one after the other with the same prompts, lengths and KV
memory, then writes OUT/results.json, OUT/summary.md (ratios to vLLM) and
OUT/throughput.png. With --decode-phase it measures the decode phase alone, as the
engine issue measured vLLM's: each engine runs the prompts twice, for 1 output token and
for output-len + 1, and the difference in seconds is what output-len decode steps of the
whole batch cost; OUT/decode_phase.md gives those output tokens/s and their ratio to vLLM's.

usage: python benchmarks/engine_vs_vllm.py --vllm-python /path/to/vllm-venv/bin/python \\
           [--num-prompts 32 --prompt-len 2048 --output-len 256 --kv-gib 1 --keep 0.125] \\
           [--vllm-dtype float32] [--swiftkv-model DIR --swiftkv-policies ada-snapkv] [--decode-phase] --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kvsqueeze.bench.arguments import positive_int

ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "bench" / "anchor_vllm_cpu.py"
VLLM = "vLLM 0.32 CPU"


def run_vllm(args: argparse.Namespace, model_dir: Path, text: Path, out_len: int) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(args.kv_gib), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(
        [args.vllm_python, str(ANCHOR), str(model_dir), str(text), str(args.num_prompts), str(args.prompt_len),
         str(out_len), args.vllm_dtype],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_ours(args: argparse.Namespace, model: str, policies: str, out_len: int | None = None) -> list[dict]:
    cmd = [str(Path(sys.executable).parent / "kvsqueeze"), "bench-engine", "--model", model,
           "--policies", policies, "--keep", str(args.keep), "--num-prompts", str(args.num_prompts),
           "--prompt-len", str(args.prompt_len), "--output-len", str(out_len or args.output_len),
           "--kv-memory", f"{args.kv_gib}GiB", "--dtype", "bf16", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument(
        "--vllm-dtype", choices=("bfloat16", "float32"), default="bfloat16",
        help="vLLM's dtype (ours stays bf16: fp32 products on a CPU without bf16 instructions, bf16 KV); "
        "on such a CPU vLLM's bf16 is emulated and its float32 is the faster peer",
    )  # fmt: skip
    parser.add_argument("--num-prompts", type=positive_int, default=32)
    parser.add_argument("--prompt-len", type=positive_int, default=2048)
    parser.add_argument("--output-len", type=positive_int, default=256)
    parser.add_argument("--kv-gib", type=positive_int, default=1)
    parser.add_argument("--keep", type=float, default=0.125)
    parser.add_argument("--policies", default="full,snapkv,ada-snapkv")
    parser.add_argument("--swiftkv-model", help="also run this SwiftKV checkpoint folder (kvsqueeze distill's output)")
    parser.add_argument("--swiftkv-policies", default="ada-snapkv")
    parser.add_argument("--decode-phase", action="store_true", help="measure the decode phase alone (see above)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from kvsqueeze.bench.engine import essays_file_text
    from kvsqueeze.hf.models import model_folder

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(essays_file_text())
    if args.decode_phase:
        decode_phase(args, model_folder("smollm2-135m"), Path(f.name))
        return
    vllm = run_vllm(args, model_folder("smollm2-135m"), Path(f.name), args.output_len)
    ours = [r | {"engine": "kvsqueeze"} for r in run_ours(args, "smollm2-135m", args.policies)]
    if args.swiftkv_model:
        swift = run_ours(args, args.swiftkv_model, args.swiftkv_policies)
        ours += [r | {"engine": "kvsqueeze + SwiftKV"} for r in swift]
    write_record(args, "results.json", {"vllm": vllm, "kvsqueeze": ours})
    lines = table_head(
        f"kvsqueeze engine vs vLLM CPU ({args.num_prompts} x {args.prompt_len} in, {args.output_len} out, "
        f"{args.kv_gib} GiB KV, ours bf16, vLLM {args.vllm_dtype}, one sitting)",
        ["engine", "policy", "seconds", "total tok/s", "output tok/s", "x vLLM total", "x vLLM output", "max running"],
    )
    vllm_cells = f"{vllm['seconds']} | {vllm['total_tok_s']} | {vllm['gen_tok_s']}"
    lines.append(f"| {VLLM} {args.vllm_dtype} | full | {vllm_cells} | 1.00 | 1.00 | |")
    for r in ours:
        lines.append(
            f"| {r['engine']} | {r['policy']} | {r['seconds']} | {r['total_tokens_per_second']} | "
            f"{r['output_tokens_per_second']} | {r['total_tokens_per_second'] / vllm['total_tok_s']:.2f} | "
            f"{r['output_tokens_per_second'] / vllm['gen_tok_s']:.2f} | {r['max_running']} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"vLLM {args.vllm_dtype}"] + [
        f"{'swiftkv ' if 'SwiftKV' in r['engine'] else 'ours '}{r['policy']}" for r in ours
    ]
    total = [vllm["total_tok_s"]] + [r["total_tokens_per_second"] for r in ours]
    output = [vllm["gen_tok_s"]] + [r["output_tokens_per_second"] for r in ours]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, values, title in ((axes[0], total, "total tokens/s"), (axes[1], output, "output tokens/s")):
        bars = ax.bar(names, values, color=["#888"] + ["#2a7"] * len(ours))
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"SmolLM2-135M, 2-core CPU, {args.num_prompts} x {args.prompt_len} in, {args.output_len} out")
    fig.tight_layout()
    fig.savefig(args.out / "throughput.png", dpi=120)


def write_record(args: argparse.Namespace, name: str, record: dict) -> None:
    """OUT/name: the workload's arguments and `record`, as JSON."""
    (args.out / name).write_text(json.dumps({"workload": vars(args) | {"out": str(args.out)}} | record, indent=2))


def table_head(title: str, columns: list[str]) -> list[str]:
    """A markdown title and a table's header rows."""
    return [f"# {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def decode_phase(args: argparse.Namespace, model_dir: Path, text: Path) -> None:
    """Each engine at 1 and output-len + 1 output tokens: the extra seconds are the decode
    phase's (OUT/decode_phase.json, OUT/decode_phase.md)."""
    n, m = args.num_prompts, args.output_len
    runs = {}
    for out_len in (1, m + 1):
        vllm = run_vllm(args, model_dir, text, out_len)
        runs[(f"{VLLM} {args.vllm_dtype}", "full", out_len)] = vllm["seconds"]
        for r in run_ours(args, "smollm2-135m", args.policies, out_len):
            runs[("kvsqueeze", r["policy"], out_len)] = r["seconds"]
    rows = []
    for engine, policy in dict.fromkeys((e, p) for e, p, _ in runs):
        prefill, whole = runs[(engine, policy, 1)], runs[(engine, policy, m + 1)]
        decode = whole - prefill
        rows.append({"engine": engine, "policy": policy, "seconds_1_out": prefill, f"seconds_{m + 1}_out": whole,
                     "decode_seconds": round(decode, 2), "decode_output_tok_s": round(n * m / decode, 1),
                     "prefill_tok_s": round(n * args.prompt_len / prefill, 1)})  # fmt: skip
    base = rows[0]["decode_output_tok_s"]
    write_record(args, "decode_phase.json", {"rows": rows})
    lines = table_head(
        f"Decode phase: {n} x {args.prompt_len} in, {m} tokens decoded ({m + 1} out minus 1 out), "
        f"{args.kv_gib} GiB KV, ours bf16, vLLM {args.vllm_dtype}, one sitting",
        ["engine", "policy", "s, 1 out", "s, all out", "decode s", "decode output tok/s", "x vLLM", "prefill tok/s"],
    )
    for r in rows:
        lines.append(f"| {r['engine']} | {r['policy']} | {r['seconds_1_out']} | {r[f'seconds_{m + 1}_out']} | "
                     f"{r['decode_seconds']} | {r['decode_output_tok_s']} | {r['decode_output_tok_s'] / base:.2f} | "
                     f"{r['prefill_tok_s']} |")  # fmt: skip
    (args.out / "decode_phase.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
