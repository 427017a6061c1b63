"""Resuming keys on every setting, a bad --out fails before model work, Ctrl-C says
what was saved, and reports are replaced whole: on a tiny random model."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

import kvsqueeze.eval.runner as runner_module
import kvsqueeze.eval.unit as unit_module
from kvsqueeze.cli import main
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.eval.atomic import replacing
from kvsqueeze.eval.config import DEFAULT_SETTINGS, SETTINGS, EvalConfig
from kvsqueeze.eval.results import read_rows, row_key
from kvsqueeze.eval.runner import plan, run_eval

# A value other than the default for every setting; a new setting must be added here.
CHANGED = {
    "model": "tiny-random-qwen2",
    "seed": 1,
    "question_agnostic": True,
    "data": "other.jsonl",
    "window": 16,
    "alpha": 0.5,
    "group_reduce": "max",
    "pooling": "max",
    "kernel": 3,
    "ada_pool_kernel": 1,
    "dtype": "bfloat16",
    "kv_bits": 4,
    "kv_group": 16,
    "kv_residual": 64,
    "kv_key_axis": "token",
}


def config(out: Path, **changes) -> EvalConfig:
    base = EvalConfig(
        model="tiny-random-llama",
        task="needle",
        policies=("full", "snapkv", "ada-snapkv"),
        out=out,
        keeps=(0.3,),
        lengths=(300,),
        samples=2,
    )
    return replace(base, **changes)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    run_eval(config(out))
    return out, read_rows(out / "results.jsonl")


def test_rows_record_every_setting(first_run):
    _, rows = first_run
    assert set(CHANGED) == set(SETTINGS)
    for row in rows:
        assert {name: row[name] for name in SETTINGS} == {**DEFAULT_SETTINGS, "model": "tiny-random-llama"}


@pytest.mark.parametrize("name", CHANGED)
def test_a_changed_setting_reruns_every_row(first_run, name):
    _, rows = first_run
    done = {row_key(r) for r in rows}
    assert list(plan(config(Path("unused")), done)) == []  # same settings: nothing to do
    units = list(plan(config(Path("unused"), **{name: CHANGED[name]}), done))
    assert len(units) == 2 and all(len(u.policies) == 3 for u in units)


def test_a_rerun_with_another_window_adds_rows_and_a_section(first_run, tmp_path):
    _, rows = first_run
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_eval(config(tmp_path, window=16))
    after = read_rows(tmp_path / "results.jsonl")
    assert len(after) == 2 * len(rows)
    assert sorted(r["window"] for r in after) == [16] * len(rows) + [32] * len(rows)
    summary = (tmp_path / "summary.md").read_text()
    assert "## needle — question-aware — window=16" in summary and "## needle — question-aware — window=32" in summary
    assert (tmp_path / "score_vs_budget_needle_question-aware_window16.png").is_file()


def test_rows_without_the_newer_fields_still_resume(first_run, tmp_path, monkeypatch):
    _, rows = first_run
    newer = ("data", "window", "alpha", "group_reduce", "dtype")
    old = [{k: v for k, v in r.items() if k not in newer} for r in rows]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    calls = []
    monkeypatch.setattr(unit_module, "evaluate_sample", lambda *args: calls.append(args) or [])
    run_eval(config(tmp_path))
    assert calls == []  # the old rows were run with today's defaults: nothing to redo


@pytest.mark.parametrize("where", ["out", "parent"])
def test_out_naming_a_file_fails_before_model_work(tmp_path, monkeypatch, capsys, where):
    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "taken" if where == "out" else tmp_path / "taken" / "sub"

    def no_model(*args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner_module, "loaded", no_model)
    with pytest.raises(KVSqueezeError, match="is a file, not a folder"):
        run_eval(config(out))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "tiny-random-llama", "--keep", "0.3", "--lengths", "300", "--out", str(out)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is a file, not a folder" in lines[0]
    assert (tmp_path / "taken").read_text() == "mine"


def test_ctrl_c_says_what_was_saved_and_reports_are_current(tmp_path, monkeypatch, capsys):
    real, calls = unit_module.evaluate_sample, []

    def interrupted_on_second_sample(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(unit_module, "evaluate_sample", interrupted_on_second_sample)
    argv = ["eval", "--model", "tiny-random-llama", "--policies", "full,snapkv,ada-snapkv", "--keep", "0.3"]
    argv += ["--lengths", "300", "--depths", "0.5", "--samples", "2", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 130
    assert f"3 rows saved in {tmp_path}; rerun the same command to resume" in capsys.readouterr().err
    # The reports were written after the first sample, from its 3 rows.
    assert "3 rows (results.jsonl)" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "ada_head_budgets.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "summary.md"
    path.write_text("previous report")
    with pytest.raises(KeyboardInterrupt), replacing(path) as tmp:
        tmp.write_text("half of a new rep")
        raise KeyboardInterrupt
    assert path.read_text() == "previous report"
    with replacing(path) as tmp:
        tmp.write_text("new report")
    assert path.read_text() == "new report"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]
