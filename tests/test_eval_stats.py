"""The report's statistics on values whose answer is known by hand: the exact sign
test, the bootstrap interval of a mean, paired wins / ties / losses, and how
summary.md shows them for Ada-KV against its uniform twin."""

import pytest
from test_eval_report_rows import row

from kvsqueeze.eval.report import summary_markdown
from kvsqueeze.eval.stats import PairedComparison, bootstrap_interval, compare_paired, sign_test


@pytest.mark.parametrize(
    "wins, losses, p",
    [
        (5, 0, 2 / 2**5),  # all five untied pairs one way: 2 x (1/2)^5
        (0, 5, 2 / 2**5),
        (8, 2, 2 * (1 + 10 + 45) / 2**10),  # 2 x P(X <= 2), X ~ Binomial(10, 1/2)
        (3, 3, 1.0),
        (0, 0, 1.0),  # only ties: no evidence either way
        (1, 0, 1.0),
    ],
)
def test_sign_test_matches_the_binomial_tail(wins, losses, p):
    assert sign_test(wins, losses) == pytest.approx(p)


def test_sign_test_refuses_negative_counts():
    with pytest.raises(ValueError, match="wins and losses"):
        sign_test(-1, 3)


def test_paired_comparison_counts_ties_within_the_tolerance():
    versus = compare_paired([1.0, 0.5, -2.0, 0.30005, 0.0], [0.0, 0.5, -1.0, 0.3, 0.0], tie=1e-4)
    assert versus == PairedComparison(wins=1, ties=3, losses=1)
    assert versus.p_value == 1.0
    assert compare_paired([0.30005], [0.3]).wins == 1  # without a tolerance any difference counts


def test_paired_comparison_refuses_unpaired_lengths():
    with pytest.raises(ValueError, match="same length"):
        compare_paired([1.0, 2.0], [1.0])


def test_bootstrap_interval_of_constant_values_is_that_value():
    assert bootstrap_interval([0.25] * 7) == (0.25, 0.25)
    assert bootstrap_interval([-3.0]) == (-3.0, -3.0)


def test_bootstrap_interval_of_a_fair_coin_is_about_two_standard_errors():
    # Mean 0.5, standard error 0.5 / sqrt(100) = 0.05: the 95% interval is about 0.5 +- 0.1.
    low, high = bootstrap_interval([0.0, 1.0] * 50)
    assert 0.38 < low < 0.43 and 0.57 < high < 0.62
    assert bootstrap_interval([0.0, 1.0] * 50) == (low, high)  # seeded: the report is reproducible


def test_bootstrap_interval_refuses_bad_input():
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([1.0, 2.0], confidence=1.5)


def ada_row_cells(summary: str, ada: str, budget: str) -> list[str]:
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:3:2] == [ada, budget]:
            return cells
    raise AssertionError(f"no {ada} {budget} row in the Ada comparison")


def test_summary_pairs_ada_with_its_twin_on_the_same_samples():
    rows = []
    for sample in range(6):
        rows.append(row("full", 1.0, sample=sample, answer_logprob=-0.1))
        rows.append(row("snapkv", 1.0, sample=sample, answer_logprob=-2.0))
        # Ada beats uniform on log-prob on every sample, and ties on the score.
        rows.append(row("ada-snapkv", 1.0, sample=sample, answer_logprob=-1.0))
    rows.append(row("ada-snapkv", 0.0, sample=6, answer_logprob=-9.0))  # no twin: left out of the pairing
    summary = summary_markdown(rows)
    cells = ada_row_cells(summary, "ada-snapkv", "keep=0.2")
    header = [c.strip() for c in summary.split("| Ada variant |")[1].splitlines()[0].strip("|").split("|")]
    by_name = dict(zip(["Ada variant", *header], cells, strict=True))
    assert by_name["pairs"] == "6"
    assert by_name["score W / T / L"] == "0 / 6 / 0"
    assert by_name["log-prob W / T / L"] == "6 / 0 / 0"
    ps = [c for h, c in zip(["Ada variant", *header], cells, strict=True) if h == "p"]
    assert ps == ["1.000", f"{2 / 2**6:.3f}"]
    assert by_name["Δ log-prob"] == "+1.000 [+1.000, +1.000]"
    # The mean tables show every cell with its interval; Ada's unpaired sample still counts there.
    assert "| **full cache** | 1.000 [1.000, 1.000] |" in summary
    ada_mean = (6 * 1.0 + 0.0) / 7
    assert f"| ada-snapkv | {ada_mean:.3f} [" in summary
    assert "Answer log-prob" in summary and "| snapkv | -2.000 [-2.000, -2.000] |" in summary
