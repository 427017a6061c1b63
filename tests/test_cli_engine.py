"""`kvsqueeze bench-engine` and `kvsqueeze serve` from the command line: a real (small)
engine benchmark on a tiny model folder, and bad input as one `error:` line."""

from __future__ import annotations

import json

import pytest
import torch
from cli_cases import run, saved_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_model(tmp_path_factory, "cli-engine")


def test_bench_engine_reports_every_policy(folder, capsys):
    argv = ["bench-engine", "--model", folder, "--policies", "full,ada-snapkv", "--keep", "0.25", "--num-prompts", "3",
            "--prompt-len", "120", "--output-len", "4", "--kv-memory", "8MiB", "--dtype", "fp32", "--json"]  # fmt: skip
    code, out, err = run(argv, capsys)
    assert code == 0, err
    rows = json.loads(out)
    assert [r["policy"] for r in rows] == ["full", "ada-snapkv"]
    for r in rows:
        assert r["max_running"] == 3 and r["preemptions"] == 0 and r["kv_memory_bytes"] == 8 * 2**20
        assert r["total_tokens_per_second"] > r["output_tokens_per_second"] > 0
    full, ada = rows
    assert ada["kv_bytes_stored_peak"] < full["kv_bytes_stored_peak"]
    assert "policy ada-snapkv" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench-engine", "--policies", "nope"], "unknown policy"),
        (["bench-engine", "--keep", "0.5", "--tokens", "3"], "either --keep or --tokens"),
        (["bench-engine", "--kv-memory", "lots"], "size"),
        (["bench-engine", "--model", "tiny-random-llama"], "model folder"),
        (["serve", "--policy", "nope"], "unknown policy"),
        (["serve", "--kv-memory", "-1GiB"], "kv memory"),
        (["serve", "--model", "/nonexistent"], "model folder"),
        (["serve", "--max-kv-tokens", "3"], "max-kv-tokens"),
        (["serve", "--port", "70000"], "port"),
    ],
)
def test_bad_engine_arguments_are_one_error_line(argv, needle, capsys):
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err
    assert torch.get_num_threads() >= 1


BAD = ("", "-7", str(10**30), "abc", "nan", "1e400", "inf")
ENGINE_FLAGS = ("--keep", "--tokens", "--window", "--kv-memory")
BENCH_FLAGS = (*ENGINE_FLAGS, "--num-prompts", "--prompt-len", "--output-len")
SERVE_FLAGS = (*ENGINE_FLAGS, "--alpha", "--max-kv-tokens", "--port", "--max-num-seqs", "--max-num-batched-tokens")


def _fuzz(argv, capsys) -> None:
    code, _, err = run(argv, capsys)
    assert "Traceback" not in err
    assert code in (0, 2), err
    if code == 2:  # progress lines may come first; the failure is one `error:` line, the last
        lines = err.strip().splitlines()
        assert [line for line in lines if line.startswith("error:")] == lines[-1:], err


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("flag", BENCH_FLAGS)
def test_every_bench_engine_flag_takes_bad_values_with_one_error_line(folder, flag, value, capsys):
    base = {"--model": folder, "--policies": "snapkv", "--keep": "0.5", "--num-prompts": "2", "--prompt-len": "60",
            "--output-len": "2", "--kv-memory": "4MiB", "--dtype": "fp32"}  # fmt: skip
    if flag == "--tokens":
        del base["--keep"]
    argv = ["bench-engine", *[x for k, v in {**base, flag: value}.items() for x in (k, v)], "--json"]
    _fuzz(argv, capsys)


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("flag", SERVE_FLAGS)
def test_every_serve_flag_takes_bad_values_with_one_error_line(folder, flag, value, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)  # a valid call returns instead of serving
    base = {"--model": folder, "--policy": "ada-snapkv", "--keep": "0.5", "--kv-memory": "4MiB", "--dtype": "fp32"}
    if flag == "--tokens":
        del base["--keep"]
    _fuzz(["serve", *[x for k, v in {**base, flag: value}.items() for x in (k, v)]], capsys)
