"""--kv-bits / --kv-group / --kv-residual on generate, eval and bench (tiny model)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvsqueeze.cli import app
from kvsqueeze.eval.results import read_rows

MODEL = "tiny-random-llama"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 byte tokens


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


def generate(runner: CliRunner, *args: str):
    return runner.invoke(app, ["generate", "--model", MODEL, "--prompt", PROMPT, "--max-new-tokens", "3", *args])


def test_generate_reports_the_quantized_cache_bytes(runner):
    full = json.loads(generate(runner, "--json").stdout)
    quant = json.loads(generate(runner, "--json", "--policy", "ada-snapkv", "--keep", "0.5", "--kv-bits", "4").stdout)
    assert full["kv_quantization"] == "kv16" and quant["kv_quantization"] == "kv4 g32 r128"
    assert quant["kv_bytes_full"] == full["kv_bytes_full"]
    # Half the tokens, every one quantized at 4 bits (the prefill is quantized whole).
    assert quant["kv_bytes_stored"] < 0.45 * full["kv_bytes_stored"]
    plain = generate(runner, "--kv-bits", "2", "--kv-residual", "0", "--kv-group", "16")
    assert plain.exit_code == 0 and "kv2 g16 r0" in plain.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-bits", "3"], "kv bits must be one of"),
        (["--kv-bits", "4", "--kv-group", "0"], "kv group must be between"),
        (["--kv-bits", "4", "--kv-residual", "-5"], "kv residual must be between"),
        (["--kv-bits", "4", "--kv-group", "12"], "not a multiple of the channel group"),
        (["--kv-bits", "4", "--kv-key-axis", "head"], "key_axis must be"),
    ],
)
def test_bad_quantization_flags_get_one_error_line(runner, args, message):
    result = generate(runner, *args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_eval_rows_carry_the_kv_bits_in_their_key(runner, tmp_path):
    base = ["eval", "--model", MODEL, "--task", "ppl", "--lengths", "300", "--policies", "snapkv", "--keep", "0.5"]
    for bits in ("4", "16"):
        result = runner.invoke(app, [*base, "--kv-bits", bits, "--kv-residual", "32", "--out", str(tmp_path)])
        assert result.exit_code == 0, result.stderr
    rows = read_rows(tmp_path / "results.jsonl")
    assert sorted((r["kv_bits"], r["policy"]) for r in rows) == [
        (4, "full"),
        (4, "snapkv"),
        (16, "full"),
        (16, "snapkv"),
    ]
    by_bits = {(r["kv_bits"], r["policy"]): r for r in rows}
    assert by_bits[4, "full"]["kv_bytes_stored"] < 0.5 * by_bits[16, "full"]["kv_bytes_stored"]
    assert all(r["kv_residual"] == 32 and r["kv_group"] == 32 for r in rows)


def test_bench_compares_kv_bits_in_one_run(runner):
    result = runner.invoke(
        app,
        ["bench", "--model", MODEL, "--policies", "full", "--context", "300", "--batch", "2"]
        + ["--new-tokens", "2", "--kv-bits", "16,4", "--kv-residual", "16", "--json"],
    )
    assert result.exit_code == 0, result.stderr
    rows = {row["policy"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"full", "full kv4 g32 r16"}
    # All 300 prompt tokens quantized; the 2 decoded ones (+ slack) in the fp32 residual.
    assert rows["full kv4 g32 r16"]["kv_bytes_stored"] < 0.4 * rows["full"]["kv_bytes_stored"]
