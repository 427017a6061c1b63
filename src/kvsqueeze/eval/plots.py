"""PNG plots of a sweep: score against budget per policy, the needle heatmap
(depth x length) per policy, and Ada-KV's per-head budgets (layer x head); per
model and per value of any setting that differs between its rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kvsqueeze.eval.atomic import replacing  # noqa: E402
from kvsqueeze.eval.results import row_key  # noqa: E402
from kvsqueeze.eval.table import (  # noqa: E402
    MODES,
    budget_label,
    budget_value,
    grouped,
    mean,
    ordered_budgets,
    ordered_policies,
    parts,
)

MARKERS = "osD^vPX*<>"
STEMS = ("score_vs_budget", "needle_heatmap", "ada_head_budgets")
DODGE = 0.012  # sideways shift of a line that repeats an earlier one, as a fraction of the x range


@dataclass(frozen=True)
class Line:
    label: str
    xs: list[float]  # the budgets, shifted sideways when the line repeats an earlier one
    ys: list[float]
    marker: str


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text.replace("=", "")).strip("_")


def _by_keep(rows: list[dict]) -> bool:
    return any(r.get("keep") is not None for r in rows if r["policy"] != "full")


def score_axes(rows: list[dict], perplexity: bool) -> tuple[tuple[float, float], tuple[float, float]]:
    """x and y limits set by what the axes measure, never by the data's spread alone,
    so one budget or equal scores still give a readable scale: budgets from 0 with
    room past the largest, scores on [0, 1], perplexity at least ±10% around the data."""
    largest = max(budget_value(r) for r in rows if r["policy"] != "full")
    xlim = (0.0, min(1.02, 1.3 * largest) if _by_keep(rows) else 1.3 * largest)
    if not perplexity:
        return xlim, (-0.03, 1.03)
    scores = [r["score"] for r in rows]
    return xlim, (0.9 * min(scores), 1.1 * max(scores))


def score_lines(rows: list[dict], xlim: tuple[float, float]) -> list[Line]:
    """Each compressed policy's mean score per budget. A line equal to an earlier one
    is shifted sideways and labelled as equal, so it does not hide behind it."""
    lines: list[Line] = []
    firsts: dict[tuple, str] = {}  # (xs, ys) -> the first policy drawn with them
    repeats: dict[tuple, int] = {}
    for i, policy in enumerate(p for p in ordered_policies(rows) if p != "full"):
        by_budget = grouped((r for r in rows if r["policy"] == policy), budget_value)
        xs = sorted(by_budget)
        ys = [mean(r["score"] for r in by_budget[x]) for x in xs]
        key = (tuple(xs), tuple(round(y, 9) for y in ys))
        label, shift = policy, 0.0
        if key in firsts:
            repeats[key] = repeats.get(key, 0) + 1
            label, shift = f"{policy} (= {firsts[key]})", repeats[key] * DODGE * (xlim[1] - xlim[0])
        else:
            firsts[key] = policy
        lines.append(Line(label, [x + shift for x in xs], ys, MARKERS[i % len(MARKERS)]))
    return lines


def score_vs_budget_figure(rows: list[dict], title: str, perplexity: bool) -> Figure:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xlim, ylim = score_axes(rows, perplexity)
    full = mean(r["score"] for r in rows if r["policy"] == "full")
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", label="full cache")
    for line in score_lines(rows, xlim):
        ax.plot(line.xs, line.ys, marker=line.marker, label=line.label, alpha=0.85)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xticks(sorted({budget_value(r) for r in rows if r["policy"] != "full"}))
    ax.set_xlabel("keep ratio" if _by_keep(rows) else "tokens per head")
    ax.set_ylabel("perplexity (lower is better)" if perplexity else "score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _write_values(ax: plt.Axes, image: AxesImage, grid: list[list[float]], digits: int) -> None:
    """Each cell's value on it, dark on light colours and light on dark ones."""
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if value != value:  # NaN: no rows for this cell
                continue
            red, green, blue, _ = image.cmap(image.norm(value))
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
            color = "black" if light else "white"
            ax.text(j, i, f"{value:.{digits}f}", ha="center", va="center", fontsize=7, color=color)


def needle_heatmap_figure(rows: list[dict], title: str) -> Figure:
    """One panel per policy and budget: mean score by depth (rows) and length (columns)."""
    panels = [("full", "full")] + [(p, b) for b in ordered_budgets(rows) for p in ordered_policies(rows) if p != "full"]
    panels = [(p, b) for p, b in panels if any(r["policy"] == p and budget_label(r) == b for r in rows)]
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    height = 3.0 * nrows + 1.2
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, height), squeeze=False)
    # Fixed inches for the title above and the axis label below, whatever the rows.
    fig.subplots_adjust(hspace=0.45, wspace=0.35, top=1 - 0.8 / height, bottom=0.75 / height)
    cells = grouped(rows, lambda r: (r["policy"], budget_label(r), r["depth"], r["length"]))
    image = None
    for ax, (policy, budget) in zip(axes.flat, panels, strict=False):
        grid = [[mean(r["score"] for r in cells.get((policy, budget, d, n), [])) for n in lengths] for d in depths]
        grid = [[float("nan") if v is None else v for v in line] for line in grid]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        _write_values(ax, image, grid, 2)
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
    return fig


def head_budget_row(rows: list[dict]) -> dict | None:
    """The Ada-KV row whose per-head budgets say the most: the smallest budget (where
    heads compete hardest), and there the longest prompt (the most to choose from)."""
    ada = [r for r in rows if r["policy"].startswith("ada-") and r.get("kept_tokens_per_head")]
    if not ada:
        return None
    return min(
        ada,
        key=lambda r: (budget_value(r), -r["prompt_tokens"], r["policy"] != "ada-snapkv", r["task"], r["sample"]),
    )


def head_budgets_figure(row: dict) -> Figure:
    """Tokens each kv-head kept after prefill, per layer, for one sample."""
    kept = row["kept_tokens_per_head"]
    fig, ax = plt.subplots(figsize=(max(5.5, 0.6 * len(kept[0]) + 2.5), max(3, 0.22 * len(kept) + 1.5)))
    image = ax.imshow(kept, aspect="auto", cmap="viridis")
    if len(kept) * len(kept[0]) <= 200:  # numbers stay legible
        _write_values(ax, image, kept, 0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # heads and layers are whole numbers
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_title(
        f"{row['policy']} {budget_label(row)}: tokens kept per head\n{row['model']}, {row['task']} "
        f"sample {row['sample']}, {row['prompt_tokens']}-token prompt",
        fontsize=9,
    )
    fig.colorbar(image, ax=ax, label="tokens kept")
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path


def _file(out: Path, stem: str, names: list[str]) -> Path:
    return out / ("_".join([stem, *(_slug(n) for n in names if n)]) + ".png")


def write_plots(rows: list[dict], out: Path, new: list[dict] | None = None) -> list[Path]:
    """The plots of every model and setting; names and titles carry the model and the
    settings only when the results hold more than one. With `new` (the rows just
    added), a plot whose rows include none of them is redrawn only if its file is
    missing: redrawing them all after every sample would take seconds."""
    new_keys = None if new is None else {row_key(r) for r in new}

    def stale(path: Path, rows: list[dict]) -> bool:
        return new_keys is None or not path.is_file() or any(row_key(r) in new_keys for r in rows)

    written, expected = [], set()
    models = grouped(rows, lambda r: r["model"])
    for model, model_rows in sorted(models.items()):
        model_name = [model] if len(models) > 1 else []
        model_parts = parts(model_rows)
        for part in model_parts:
            mode = MODES[part.agnostic]
            names = [*model_name, part.settings]
            title = ", ".join(n for n in [part.family, mode, *names] if n)
            path = _file(out, "score_vs_budget", [part.family, mode, *names])
            if any(r["policy"] != "full" for r in part.rows):
                expected.add(path)
                if stale(path, part.rows):
                    fig = score_vs_budget_figure(part.rows, title, perplexity=part.family == "ppl")
                    written.append(_save(fig, path))
            path = _file(out, "needle_heatmap", [mode, *names])
            if part.family == "needle":
                expected.add(path)
                if stale(path, part.rows):
                    written.append(_save(needle_heatmap_figure(part.rows, title), path))
        for settings in dict.fromkeys(p.settings for p in model_parts):
            variant = [r for p in model_parts if p.settings == settings for r in p.rows]
            row, path = head_budget_row(variant), _file(out, "ada_head_budgets", [*model_name, settings])
            if row is not None:
                expected.add(path)
                if stale(path, variant):
                    written.append(_save(head_budgets_figure(row), path))
    # A plot named for settings the results no longer tell apart (e.g. the unlabelled
    # one from before a second window was run) would show a part without saying so.
    for stem in STEMS:
        for path in out.glob(f"{stem}*.png"):
            if path not in expected:
                path.unlink()
    return written
