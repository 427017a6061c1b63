"""Reports from hand-made rows: one report per model, one section per setting, no
mean across either, and old results files (without the newer setting fields) load."""

from pathlib import Path

import pytest

from kvsqueeze.eval.config import DEFAULT_SETTINGS
from kvsqueeze.eval.report import summary_markdown
from kvsqueeze.eval.results import read_rows

OLD_RESULTS = Path(__file__).parent.parent / "docs" / "results" / "smollm2-135m" / "results.jsonl"


def row(policy: str = "snapkv", score: float = 1.0, **changes) -> dict:
    base = {
        **DEFAULT_SETTINGS,
        "model": "tiny-random-llama",
        "task": "needle",
        "sample": 0,
        "length": 700,
        "depth": 0.5,
        "policy": policy,
        "keep": 1.0 if policy == "full" else 0.2,
        "tokens": None,
        "score": score,
        "answer_logprob": -1.0,
        "prediction": "",
        "prompt_tokens": 700,
        "kv_bytes_stored": 20,
        "kv_bytes_full": 100,
        "prefill_seconds": 0.1,
        "kept_tokens_per_head": [[140, 140]],
    }
    return {**base, **changes}


def table_rows(section: str) -> dict[str, str]:
    """policy -> its cells' means (without their intervals), from the first score table
    of a summary section."""
    cells = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("| policy") and not line.startswith("| *KV"):
            name, *rest = [c.strip() for c in line.strip("|").split("|")]
            cells.setdefault(name, " ".join(c.split(" [")[0] for c in rest))
    return cells


def test_two_models_get_two_reports_never_averaged():
    rows = [
        row("full", 1.0),
        row("snapkv", 1.0),
        row("full", 0.0, model="tiny-random-qwen2"),
        row("snapkv", 0.0, model="tiny-random-qwen2"),
    ]
    summary = summary_markdown(rows)
    llama, qwen = summary.split("# kvsqueeze eval — tiny-random-qwen2")
    assert "# kvsqueeze eval — tiny-random-llama" in llama
    assert table_rows(llama) == {"**full cache**": "1.000", "snapkv": "1.000"}
    assert table_rows(qwen) == {"**full cache**": "0.000", "snapkv": "0.000"}
    assert "0.500" not in summary  # the mean of both models would be


@pytest.mark.parametrize(
    "name, value", [("window", 16), ("alpha", 0.5), ("dtype", "bfloat16"), ("group_reduce", "max"), ("seed", 1)]
)
def test_rows_of_other_settings_are_separate_named_sections(name, value):
    changed = {name: value}
    rows = [row("full", 1.0), row("snapkv", 1.0), row("full", 0.0, **changed), row("snapkv", 0.0, **changed)]
    summary = summary_markdown(rows)
    old, new = f"{name}={DEFAULT_SETTINGS[name]}", f"{name}={value}"
    assert f"Sections differ in {name}" in summary
    sections = {s.splitlines()[0]: s for s in summary.split("\n## ")[1:]}
    assert set(sections) == {f"needle — question-aware — {old}", f"needle — question-aware — {new}"}
    assert table_rows(sections[f"needle — question-aware — {old}"])["snapkv"] == "1.000"
    assert table_rows(sections[f"needle — question-aware — {new}"])["snapkv"] == "0.000"


def test_old_results_file_loads_with_the_old_defaults():
    rows = read_rows(OLD_RESULTS)
    assert len(rows) == 912
    assert all("window" not in line for line in OLD_RESULTS.read_text().splitlines()[:1])  # really an old file
    assert {(r["window"], r["alpha"], r["dtype"], r["group_reduce"]) for r in rows} == {(32, 0.2, "float32", "mean")}
    summary = summary_markdown(rows)
    assert summary.startswith("# kvsqueeze eval — smollm2-135m")
    assert (
        "Settings: seed=0, data=None, window=32, alpha=0.2, group_reduce=mean, pooling=max, kernel=7, "
        "ada_pool_kernel=1, dtype=float32, kv_bits=16, kv_group=32, kv_residual=128, kv_key_axis=channel."
    ) in summary
    assert "Sections differ" not in summary
