"""The sweep runner end to end on a tiny random model: rows, reports, resuming,
determinism, the Ray runner, and bad input through `kvsqueeze eval`."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import kvsqueeze.eval.unit as unit_module
from kvsqueeze.cli import app, with_bare_ray
from kvsqueeze.eval.config import EvalConfig
from kvsqueeze.eval.results import TIMING_FIELDS, read_rows, row_key
from kvsqueeze.eval.runner import run_eval

DATA = Path(__file__).parent / "data" / "longbench_sample.jsonl"
ROW_FIELDS = {
    "model", "task", "sample", "length", "depth", "question_agnostic", "seed", "data", "window", "alpha",
    "group_reduce", "pooling", "kernel", "ada_pool_kernel", "dtype", "kv_bits", "kv_group", "kv_residual",
    "kv_key_axis", "policy", "keep", "tokens",
    "score", "answer_logprob", "prediction", "prompt_tokens", "kv_bytes_stored", "kv_bytes_full",
    "prefill_seconds", "kept_tokens_per_head",
}  # fmt: skip


def config(out: Path, **changes) -> EvalConfig:
    base = EvalConfig(
        model="tiny-random-llama",
        task="needle",
        policies=("full", "snapkv", "ada-snapkv"),
        out=out,
        keeps=(0.3,),
        lengths=(700,),
        depths=(0.5,),
        samples=2,
    )
    return replace(base, **changes)


def comparable(rows: list[dict]) -> dict:
    return {row_key(r): {k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    run_eval(config(out))
    return out, read_rows(out / "results.jsonl")


def test_rows_and_reports(first_run):
    out, rows = first_run
    assert len(rows) == 2 * 3  # two samples x (full + two policies at one budget)
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert 0.0 <= row["score"] <= 1.0 and row["answer_logprob"] < 0
    full = [r for r in rows if r["policy"] == "full"]
    assert [r["keep"] for r in full] == [1.0, 1.0]
    for row in rows:
        ratio = row["kv_bytes_stored"] / row["kv_bytes_full"]
        assert ratio > 1.0 if row["policy"] == "full" else 0.3 <= ratio < 0.4
    for ada in (r for r in rows if r["policy"] == "ada-snapkv"):
        uniform = next(r for r in rows if r["policy"] == "snapkv" and r["sample"] == ada["sample"])
        assert sum(map(sum, ada["kept_tokens_per_head"])) == sum(map(sum, uniform["kept_tokens_per_head"]))
    summary = (out / "summary.md").read_text()
    assert "| **full cache** |" in summary and "| ada-snapkv |" in summary and "keep=0.3" in summary
    assert "Ada-KV against its uniform twin" in summary
    for png in (
        "score_vs_budget_needle_question-aware.png",
        "needle_heatmap_question-aware.png",
        "ada_head_budgets.png",
    ):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_rows(first_run, tmp_path):
    _, rows = first_run
    run_eval(config(tmp_path))
    assert comparable(read_rows(tmp_path / "results.jsonl")) == comparable(rows)


def test_resume_skips_finished_rows(first_run, tmp_path, monkeypatch):
    _, rows = first_run
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]) + '{"cut short', encoding="utf-8")
    calls = []
    real = unit_module.evaluate_sample

    def counting(model, fmt, sample, policies, *rest):
        calls.append([p.name for p in policies])
        return real(model, fmt, sample, policies, *rest)

    monkeypatch.setattr(unit_module, "evaluate_sample", counting)
    run_eval(config(tmp_path))
    assert calls == [[rows[-1]["policy"]]]  # only the missing row, of one sample
    assert comparable(read_rows(tmp_path / "results.jsonl")) == comparable(rows)

    calls.clear()
    run_eval(config(tmp_path))
    assert calls == []  # everything is there: nothing runs
    run_eval(config(tmp_path, keeps=(0.3, 0.6)))
    assert calls == [["snapkv", "ada-snapkv"]] * 2  # a new budget runs only the new rows


def test_question_agnostic_and_ppl_rows(tmp_path):
    run_eval(config(tmp_path, question_agnostic=True, samples=1))
    run_eval(config(tmp_path, task="ppl", lengths=(400,), samples=1, policies=("full", "streamingllm")))
    rows = read_rows(tmp_path / "results.jsonl")
    assert {r["question_agnostic"] for r in rows if r["task"] == "needle"} == {True}
    ppl = {r["policy"]: r["score"] for r in rows if r["task"] == "ppl"}
    assert set(ppl) == {"full", "streamingllm"} and all(p > 1.0 for p in ppl.values())
    assert "## ppl" in (tmp_path / "summary.md").read_text()


def test_longbench_rows(tmp_path):
    run_eval(config(tmp_path, task="longbench", lengths=(), data=DATA, samples=1, policies=("full", "snapkv")))
    rows = read_rows(tmp_path / "results.jsonl")
    assert len({r["task"] for r in rows}) == 6 and len(rows) == 12


def test_ray_runner_gives_the_same_rows(first_run, tmp_path):
    pytest.importorskip("ray")
    _, rows = first_run
    # One sample already done, so Ray runs one worker (fast to start) for the other.
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["sample"] == 0))
    run_eval(config(tmp_path), ray_address="local")
    ray_rows = read_rows(tmp_path / "results.jsonl")
    assert comparable(ray_rows) == comparable(rows)


def test_bare_ray_flag_means_local():
    assert with_bare_ray(["eval", "--ray"]) == ["eval", "--ray", "local"]
    assert with_bare_ray(["eval", "--ray", "--out", "x"]) == ["eval", "--ray", "local", "--out", "x"]
    assert with_bare_ray(["eval", "--ray", "10.0.0.1:6379"]) == ["eval", "--ray", "10.0.0.1:6379"]


def _runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


BASE = ["eval", "--model", "tiny-random-llama", "--keep", "0.3", "--lengths", "700", "--depths", "0.5"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "haystack"], "unknown task 'haystack'"),
        (["--policies", "full,snapkv,bogus"], "unknown policy 'bogus'"),
        (["--keep", "1.5"], "keep ratio must be in (0, 1]"),
        (["--keep", "0.1,x"], "--keep takes comma-separated numbers"),
        (["--tokens", "16"], "exactly one of --keep or --tokens"),
        (["--lengths", "9000"], "length 9000 is longer than tiny-random-llama allows (8192 positions)"),
        (["--depths", "1.5"], "depths must be in [0, 1]"),
        (["--task", "longbench"], "needs --data"),
        (["--task", "longbench", "--data", "EMPTY"], "holds no samples"),
        (["--task", "longbench", "--data", "BROKEN"], "line 2: not valid JSON"),
        (["--task", "longbench", "--data", "MISSING"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_keeps_rows(first_run, tmp_path, args, message):
    out, rows = first_run
    (tmp_path / "EMPTY").write_text("")
    (tmp_path / "BROKEN").write_text(DATA.read_text().splitlines()[0] + "\n{oops\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "BROKEN", "MISSING") else a for a in args]
    before = (out / "results.jsonl").read_bytes()
    result = _runner().invoke(app, [*BASE, "--out", str(out), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert (out / "results.jsonl").read_bytes() == before
