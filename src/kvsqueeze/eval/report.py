"""summary.md: per model, mean score and answer log-prob per policy x budget (with the
full-cache row), each with a bootstrap 95% interval, per task, mode, setting and
length, a per-subtask breakdown, and Ada-KV against its uniform twin on the same
samples (wins / ties / losses, sign test)."""

from __future__ import annotations

from pathlib import Path
from statistics import pstdev

from kvsqueeze.eval.atomic import replacing
from kvsqueeze.eval.stats import bootstrap_interval, compare_paired
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
    "Ada-KV against its uniform twin (same scorer, same total budget), paired on the samples both ran. "
    "Δ: the mean of Ada minus uniform per sample, with its interval; W / T / L: samples where Ada is "
    "better / the same / worse; p: two-sided exact sign test over the untied samples (small p: the split "
    "is unlikely if neither is better). Head spread: the coefficient of variation of Ada's per-head "
    "budgets within a layer, averaged over layers (0 = uniform):"
)
LOGPROB_HEADING = (
    "Answer log-prob: the mean log-probability per token of the right answer, teacher-forced "
    "(continuous, so it moves before the score does; higher is better)."
)
INTERVAL_NOTE = "Each cell: the sample mean [bootstrap 95% interval]."
SCORE_TIE = 1e-9  # graded scores are fractions: any difference is real
LOGPROB_TIE = 1e-4  # rows round log-probs to 4 decimals: closer than that is a tie


def _cell(value: float | None, digits: int = 3, sign: str = "") -> str:
    return "—" if value is None else f"{value:{sign}.{digits}f}"


def _with_interval(values: list[float], digits: int = 3, sign: str = "") -> str:
    """ "mean [low, high]": the sample mean and its bootstrap 95% interval (sign="+"
    for differences)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    low, high = bootstrap_interval(values)
    return f"{_cell(mean(values), digits, sign)} [{_cell(low, digits, sign)}, {_cell(high, digits, sign)}]"


def _value_table(rows: list[dict], field: str) -> list[str]:
    """policy x budget: the mean of `field` with its bootstrap 95% interval."""
    budgets = ordered_budgets(rows)
    by_cell = grouped(rows, lambda r: (r["policy"], budget_label(r)))
    if not budgets:  # only the full cache was run
        return ["| policy | value |", "|---|---|", f"| **full cache** | {_with_interval([r[field] for r in rows])} |"]
    lines = ["| policy | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
    for policy in ordered_policies(rows):
        if policy == "full":
            full = _with_interval([r[field] for r in by_cell.get(("full", "full"), [])])
            lines.append("| **full cache** | " + " | ".join([full] * len(budgets)) + " |")
            continue
        cells = [_with_interval([r[field] for r in by_cell.get((policy, b), [])]) for b in budgets]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return lines


def _score_table(rows: list[dict]) -> list[str]:
    lines = _value_table(rows, "score")
    budgets = ordered_budgets(rows)
    if budgets:
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


def _paired(ada: list[dict], uniform: list[dict], field: str) -> tuple[list[float], list[float]]:
    """The two policies' `field` on the samples both ran, in the same order."""
    twins = {_sample_key(r): r for r in uniform if r.get(field) is not None}
    pairs = [
        (r[field], twins[_sample_key(r)][field]) for r in ada if r.get(field) is not None and _sample_key(r) in twins
    ]
    return [a for a, _ in pairs], [u for _, u in pairs]


def _sample_key(row: dict) -> tuple:
    return row["task"], row["sample"], row["length"], row["depth"]


def _paired_cells(ada: list[dict], uniform: list[dict], field: str, tie: float) -> list[str]:
    """Ada's and the twin's means with intervals, Ada - uniform (mean of the paired
    differences, with its interval), wins / ties / losses and the sign test's p."""
    a, u = _paired(ada, uniform, field)
    if not a:
        return ["—"] * 5
    versus = compare_paired(a, u, tie)
    return [
        _with_interval(a),
        _with_interval(u),
        _with_interval([x - y for x, y in zip(a, u, strict=True)], sign="+"),
        f"{versus.wins} / {versus.ties} / {versus.losses}",
        f"{versus.p_value:.3f}",
    ]


def _ada_comparison(rows: list[dict]) -> list[str]:
    policies = set(r["policy"] for r in rows)
    pairs = [(p, p.removeprefix("ada-")) for p in sorted(policies) if p.startswith("ada-") and p[4:] in policies]
    if not pairs:
        return []
    lines = [
        "| Ada variant | uniform twin | budget | pairs | score (Ada) | score (uniform) | Δ score "
        "| score W / T / L | p | answer log-prob (Ada) | (uniform) | Δ log-prob | log-prob W / T / L | p "
        "| Ada head spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_policy_budget = grouped(rows, lambda r: (r["policy"], budget_label(r)))
    for ada, uniform in pairs:
        for budget in ordered_budgets(rows):
            a = by_policy_budget.get((ada, budget), [])
            u = by_policy_budget.get((uniform, budget), [])
            n = len(_paired(a, u, "score")[0])
            if not n:
                continue
            cells = [
                ada,
                uniform,
                budget,
                str(n),
                *_paired_cells(a, u, "score", SCORE_TIE),
                *_paired_cells(a, u, "answer_logprob", LOGPROB_TIE),
                _cell(mean(head_spread(r) for r in a), 2),
            ]
            lines.append("| " + " | ".join(cells) + " |")
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
            f"{len(model_rows)} rows (results.jsonl); each cell is a sample mean with its bootstrap 95% interval. "
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
    out = ["", heading, "", f"Score: {direction}. {INTERVAL_NOTE} All lengths:", "", *_score_table(rows)]
    lengths = sorted({r["length"] for r in rows})
    if len(lengths) > 1:
        for length in lengths:
            out += ["", f"Length {length}:", "", *_score_table([r for r in rows if r["length"] == length])]
    if fam not in LOWER_IS_BETTER and any(r.get("answer_logprob") is not None for r in rows):
        out += ["", f"{LOGPROB_HEADING} All lengths:", "", *_value_table(rows, "answer_logprob")]
        if len(lengths) > 1:
            for length in lengths:
                out += [
                    "",
                    f"Length {length}:",
                    "",
                    *_value_table([r for r in rows if r["length"] == length], "answer_logprob"),
                ]
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
