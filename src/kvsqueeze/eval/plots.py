"""PNG plots of a sweep: score against budget per policy, the needle heatmap
(depth x length) per policy, and Ada-KV's per-head budgets (layer x head)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from kvsqueeze.eval.table import (  # noqa: E402
    MODES,
    budget_label,
    budget_value,
    family,
    grouped,
    mean,
    ordered_budgets,
    ordered_policies,
)


def _slug(text: str) -> str:
    return text.replace("/", "_").replace("=", "").replace(" ", "_")


def plot_score_vs_budget(rows: list[dict], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    full = mean(r["score"] for r in rows if r["policy"] == "full")
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", label="full cache")
    for policy in ordered_policies(rows):
        if policy == "full":
            continue
        by_budget = grouped((r for r in rows if r["policy"] == policy), budget_value)
        xs = sorted(by_budget)
        ax.plot(xs, [mean(r["score"] for r in by_budget[x]) for x in xs], marker="o", label=policy)
    compressed = [r for r in rows if r["policy"] != "full"]
    ax.set_xlabel("keep ratio" if compressed and compressed[0].get("keep") is not None else "tokens per head")
    ax.set_ylabel("perplexity (lower is better)" if family(rows[0]["task"]) == "ppl" else "score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_needle_heatmaps(rows: list[dict], title: str, path: Path) -> None:
    """One panel per policy and budget: mean score by depth (rows) and length (columns)."""
    panels = [("full", "full")] + [(p, b) for b in ordered_budgets(rows) for p in ordered_policies(rows) if p != "full"]
    panels = [(p, b) for p, b in panels if any(r["policy"] == p and budget_label(r) == b for r in rows)]
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
    fig.subplots_adjust(hspace=0.45, wspace=0.35)
    cells = grouped(rows, lambda r: (r["policy"], budget_label(r), r["depth"], r["length"]))
    image = None
    for ax, (policy, budget) in zip(axes.flat, panels, strict=False):
        grid = [[mean(r["score"] for r in cells.get((policy, budget, d, n), [])) for n in lengths] for d in depths]
        grid = [[float("nan") if v is None else v for v in line] for line in grid]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(f"{policy} {budget}" if policy != "full" else "full cache", fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.supxlabel("prompt length (tokens)")
    fig.supylabel("needle depth")
    fig.suptitle(title)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="score")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_head_budgets(row: dict, path: Path) -> None:
    """Tokens each kv-head kept after prefill, per layer, for one sample."""
    kept = row["kept_tokens_per_head"]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(kept[0]) + 2), max(3, 0.18 * len(kept) + 1.5)))
    image = ax.imshow(kept, aspect="auto", cmap="viridis")
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_title(
        f"{row['policy']} {budget_label(row)}: tokens kept per head\n{row['task']} sample {row['sample']}, "
        f"{row['prompt_tokens']}-token prompt",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="tokens kept")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    written = []
    for (fam, agnostic), part in sorted(grouped(rows, lambda r: (family(r["task"]), r["question_agnostic"])).items()):
        mode = MODES[agnostic]
        if any(r["policy"] != "full" for r in part):
            path = out / f"score_vs_budget_{fam}_{_slug(mode)}.png"
            plot_score_vs_budget(part, f"{fam}, {mode}", path)
            written.append(path)
        if fam == "needle":
            path = out / f"needle_heatmap_{_slug(mode)}.png"
            plot_needle_heatmaps(part, f"needle, {mode}", path)
            written.append(path)
    ada = [r for r in rows if r["policy"].startswith("ada-") and r.get("kept_tokens_per_head")]
    if ada:
        smallest = min(ada, key=lambda r: (budget_value(r), r["policy"] != "ada-snapkv", r["task"], r["sample"]))
        path = out / "ada_head_budgets.png"
        plot_head_budgets(smallest, path)
        written.append(path)
    return written
