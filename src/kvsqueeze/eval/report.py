"""summary.md: per model, mean score per policy x budget (with the full-cache row),
per task, mode, setting and length, a per-subtask breakdown, and Ada-KV against its
uniform twin."""

from __future__ import annotations

from pathlib import Path
from statistics import pstdev

from kvsqueeze.eval.atomic import replacing
from kvsqueeze.eval.table import (
    MODES,
    Part,
    budget_label,
    grouped,
    mean,
    ordered_budgets,
    ordered_policies,
    parts,
    shared_settings,
    varying_settings,
)

LOWER_IS_BETTER = {"ppl"}
ADA_HEADING = (
    "Ada-KV against its uniform twin (same scorer, same total budget). Head spread: the coefficient of "
    "variation of Ada's per-head budgets within a layer, averaged over layers (0 = uniform):"
)


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _score_table(rows: list[dict]) -> list[str]:
    budgets = ordered_budgets(rows)
    by_cell = grouped(rows, lambda r: (r["policy"], budget_label(r)))
    if not budgets:  # only the full cache was run
        return ["| policy | score |", "|---|---|", f"| **full cache** | {_cell(mean(r['score'] for r in rows))} |"]
    lines = ["| policy | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    for policy in ordered_policies(rows):
        if policy == "full":
            full = _cell(mean(r["score"] for r in by_cell.get(("full", "full"), [])))
            lines.append("| **full cache** | " + " | ".join([full] * len(budgets)) + " |")
            continue
        cells = [_cell(mean(r["score"] for r in by_cell.get((policy, b), []))) for b in budgets]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    compressed = grouped((r for r in rows if r["policy"] != "full"), budget_label)
    stored = [_cell(mean(r["kv_bytes_stored"] / r["kv_bytes_full"] for r in compressed[b]), 2) for b in budgets]
    lines.append("| *KV stored / full (mean)* | " + " | ".join(stored) + " |")
    return lines


def _subtask_table(rows: list[dict]) -> list[str]:
    tasks = sorted({r["task"] for r in rows})
    by_cell = grouped(rows, lambda r: (r["policy"], budget_label(r), r["task"]))
    names = [t.split("/", 1)[1] for t in tasks]
    lines = ["| policy | budget | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(tasks)]
    for policy in ordered_policies(rows):
        for budget in ["full"] if policy == "full" else ordered_budgets(rows):
            cells = [_cell(mean(r["score"] for r in by_cell.get((policy, budget, t), [])), 2) for t in tasks]
            lines.append(f"| {policy} | {budget} | " + " | ".join(cells) + " |")
    return lines


def head_spread(row: dict) -> float | None:
    """How unequal the heads' budgets are: the coefficient of variation of tokens
    kept per kv-head within a layer, averaged over layers (0 = uniform)."""
    layers = [heads for heads in row.get("kept_tokens_per_head") or [] if len(heads) > 1 and sum(heads)]
    if not layers:
        return None
    return mean(pstdev(heads) / (sum(heads) / len(heads)) for heads in layers)


def _ada_comparison(rows: list[dict]) -> list[str]:
    policies = set(r["policy"] for r in rows)
    pairs = [(p, p.removeprefix("ada-")) for p in sorted(policies) if p.startswith("ada-") and p[4:] in policies]
    if not pairs:
        return []
    lines = [
        "| Ada variant | uniform twin | budget | score (Ada) | score (uniform) | Δ score "
        "| answer log-prob (Ada) | (uniform) | Δ log-prob | samples Ada better / same / worse | Ada head spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_sample = grouped(rows, lambda r: (r["policy"], budget_label(r), r["task"], r["sample"], r["length"], r["depth"]))
    for ada, uniform in pairs:
        for budget in ordered_budgets(rows):
            a = [r for r in rows if r["policy"] == ada and budget_label(r) == budget]
            u = [r for r in rows if r["policy"] == uniform and budget_label(r) == budget]
            if not a or not u:
                continue
            wins = [0, 0, 0]
            for r in a:
                twin = by_sample.get((uniform, budget, r["task"], r["sample"], r["length"], r["depth"]))
                if twin:
                    diff = r["score"] - twin[0]["score"]
                    wins[0 if diff > 1e-9 else 1 if abs(diff) <= 1e-9 else 2] += 1
            sa, su = mean(r["score"] for r in a), mean(r["score"] for r in u)
            la, lu = mean(r.get("answer_logprob") for r in a), mean(r.get("answer_logprob") for r in u)
            delta_l = None if la is None or lu is None else la - lu
            lines.append(
                f"| {ada} | {uniform} | {budget} | {_cell(sa)} | {_cell(su)} | {sa - su:+.3f} | {_cell(la)} "
                f"| {_cell(lu)} | {'—' if delta_l is None else f'{delta_l:+.3f}'} | {wins[0]} / {wins[1]} / {wins[2]} "
                f"| {_cell(mean(head_spread(r) for r in a), 2)} |"
            )
    return lines


def summary_markdown(rows: list[dict]) -> str:
    """One report per model; within it a section per task family, mode and value of
    any setting that differs between the model's rows, so no mean mixes settings."""
    out = []
    for model, model_rows in sorted(grouped(rows, lambda r: r["model"]).items()):
        if out:
            out.append("")
        varying = varying_settings(model_rows)
        out += [
            f"# kvsqueeze eval — {model}",
            "",
            f"{len(model_rows)} rows (results.jsonl); scores are sample means. "
            f"Settings: {shared_settings(model_rows)}."
            + (f" Sections differ in {', '.join(varying)} (never averaged together)." if varying else ""),
        ]
        for part in parts(model_rows):
            out += _section(part)
    return "\n".join(out) + "\n"


def _section(part: Part) -> list[str]:
    fam, rows = part.family, part.rows
    direction = "perplexity, lower is better" if fam in LOWER_IS_BETTER else "higher is better"
    heading = f"## {fam}" if fam in LOWER_IS_BETTER else f"## {fam} — {MODES[part.agnostic]}"
    if part.settings:
        heading += f" — {part.settings}"
    out = ["", heading, "", f"Score: {direction}. All lengths:", "", *_score_table(rows)]
    lengths = sorted({r["length"] for r in rows})
    if len(lengths) > 1:
        for length in lengths:
            out += ["", f"Length {length}:", "", *_score_table([r for r in rows if r["length"] == length])]
    if len({r["task"] for r in rows}) > 1:
        out += ["", "By subtask (all lengths):", "", *_subtask_table(rows)]
    if fam not in LOWER_IS_BETTER:
        comparison = _ada_comparison(rows)
        if comparison:
            out += ["", ADA_HEADING, "", *comparison]
    return out


def write_reports(rows: list[dict], out: Path, new: list[dict] | None = None) -> None:
    """summary.md and the PNG plots, from every row so far (`new`: the rows just added;
    plots they do not change are kept). Each file is replaced in one step, so an
    interrupted run leaves the previous complete version."""
    from kvsqueeze.eval.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    with replacing(out / "summary.md") as tmp:
        tmp.write_text(summary_markdown(rows), encoding="utf-8")
    write_plots(rows, out, new)
