"""Quality against stored bytes for eviction, KIVI quantization and both, from the rows
of `kvsqueeze eval` runs that differ in --kv-bits (and --kv-key-axis) in one folder.

Each point is one (storage, policy, budget): x = KV stored / full (measured from the
cache's tensors, mean over samples), y = the task's mean score. One line per storage
(16-bit, KIVI int8/int4/int2, naive per-token int2), so equal-bytes comparisons
(e.g. keep 0.25 at 16 bits vs keep 1.0 at 4 bits) read off one plot. Writes
tradeoff.md and tradeoff_<task>.png into the folder.

    python benchmarks/kv_quantization_tradeoff.py docs/results/kv_quantization/ppl
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvsqueeze.eval.results import read_rows  # noqa: E402


def storage(row: dict) -> str:
    bits = row.get("kv_bits", 16)
    if bits == 16:
        return "16-bit"
    naive = " naive per-token" if row.get("kv_key_axis") == "token" else " KIVI"
    return f"int{bits}{naive}"


def points(rows: list[dict]) -> dict[tuple, tuple[float, float, int]]:
    """(task, storage, policy, keep) -> (mean bytes ratio, mean score, samples)."""
    acc: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        key = (row["task"], storage(row), row["policy"], row["keep"] if row["keep"] is not None else row["tokens"])
        acc[key].append((row["kv_bytes_stored"] / row["kv_bytes_full"], row["score"]))
    return {k: (sum(x for x, _ in v) / len(v), sum(y for _, y in v) / len(v), len(v)) for k, v in acc.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an eval --out folder holding results.jsonl")
    folder = parser.parse_args().folder
    found = points(read_rows(folder / "results.jsonl"))
    lines = [
        "| task | storage | policy | keep | KV stored / full | score (mean) | samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for (task, store, policy, keep), (ratio, score, n) in sorted(found.items(), key=lambda kv: (kv[0][0], kv[1][0])):
        lines.append(f"| {task} | {store} | {policy} | {keep} | {ratio:.4f} | {score:.3f} | {n} |")
    (folder / "tradeoff.md").write_text("\n".join(lines) + "\n")
    for task in sorted({k[0] for k in found}):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for store in sorted({k[1] for k in found if k[0] == task}):
            series = sorted((v[0], v[1]) for k, v in found.items() if k[0] == task and k[1] == store)
            ax.plot([x for x, _ in series], [y for _, y in series], marker="o", label=store)
        ax.set_xlabel("KV stored / full (bytes, measured)")
        ax.set_ylabel(f"{task} score")
        ax.set_title(f"{task}: quality vs stored bytes (eviction, quantization, both)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"tradeoff_{task}.png", dpi=120)
        plt.close(fig)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
