"""What the plots are drawn from: fixed axes, equal lines kept apart, values in the
heatmap cells, and the Ada head-budget case and its ticks."""

from kvsqueeze.eval.config import DEFAULT_SETTINGS
from kvsqueeze.eval.plots import (
    head_budget_row,
    head_budgets_figure,
    needle_heatmap_figure,
    score_axes,
    score_lines,
    score_vs_budget_figure,
)


def row(policy: str, score: float, keep: float = 0.2, **changes) -> dict:
    base = {
        **DEFAULT_SETTINGS,
        "model": "tiny-random-llama",
        "task": "needle",
        "sample": 0,
        "length": 700,
        "depth": 0.5,
        "policy": policy,
        "keep": 1.0 if policy == "full" else keep,
        "tokens": None,
        "score": score,
        "prompt_tokens": 700,
        "kept_tokens_per_head": [[140, 140]] * 3,
    }
    return {**base, **changes}


def test_one_budget_gets_fixed_readable_axes():
    rows = [row("full", 0.2), row("snapkv", 0.2), row("h2o", 0.2)]
    xlim, ylim = score_axes(rows, perplexity=False)
    assert ylim == (-0.03, 1.03) and xlim[0] == 0.0 and xlim[1] > 0.2 + 0.05
    fig = score_vs_budget_figure(rows, "t", perplexity=False)
    assert fig.axes[0].get_ylim() == ylim and fig.axes[0].get_xlim() == xlim
    ppl = [row("full", 20.0), row("snapkv", 20.0)]
    low, high = score_axes(ppl, perplexity=True)[1]
    assert low <= 18.0 and high >= 22.0  # at least ±10% around equal perplexities
    tokens = [row("snapkv", 0.5, keep=None, tokens=64)]
    assert score_axes(tokens, perplexity=False)[0][1] > 64


def test_equal_lines_are_shifted_and_named():
    rows = [row(p, s, keep=k) for k in (0.1, 0.2) for p, s in (("snapkv", 0.5), ("pyramidkv", 0.5), ("h2o", 0.3))]
    lines = {line.label: line for line in score_lines(rows, (0.0, 0.3))}
    assert set(lines) == {"snapkv", "pyramidkv (= snapkv)", "h2o"}
    assert lines["snapkv"].xs == [0.1, 0.2] and lines["h2o"].xs == [0.1, 0.2]
    shifted = lines["pyramidkv (= snapkv)"]
    assert shifted.ys == lines["snapkv"].ys and all(a > b for a, b in zip(shifted.xs, [0.1, 0.2], strict=True))
    assert len({line.marker for line in lines.values()}) == 3


def test_heatmap_cells_carry_their_values():
    rows = [row("full", 1.0, depth=d) for d in (0.1, 0.9)] + [
        row("snapkv", s, depth=d) for d, s in ((0.1, 0.5), (0.9, 0.0))
    ]
    fig = needle_heatmap_figure(rows, "t")
    full, snapkv = fig.axes[0], fig.axes[1]
    assert sorted(t.get_text() for t in full.texts) == ["1.00", "1.00"]
    assert sorted(t.get_text() for t in snapkv.texts) == ["0.00", "0.50"]


def test_ada_plot_picks_longest_prompt_at_smallest_budget_with_whole_number_ticks():
    rows = [
        row("ada-snapkv", 1.0, keep=0.1, prompt_tokens=500, sample=0),
        row("ada-snapkv", 1.0, keep=0.1, prompt_tokens=900, sample=1, kept_tokens_per_head=[[50, 130]] * 5),
        row("ada-snapkv", 1.0, keep=0.4, prompt_tokens=2000, sample=2),
        row("snapkv", 1.0, keep=0.05, prompt_tokens=3000, sample=3),
    ]
    chosen = head_budget_row(rows)
    assert chosen["sample"] == 1
    ax = head_budgets_figure(chosen).axes[0]
    for ticks in (ax.get_yticks(), ax.get_xticks()):
        visible = [t for t in ticks if -0.5 <= t <= 4.5]
        assert visible and all(float(t).is_integer() for t in visible)
    assert sorted(t.get_text() for t in ax.texts) == ["130"] * 5 + ["50"] * 5
