"""`kvsqueeze bench-engine` and `serve` with --kv-bits / --kv-group / --kv-residual:
a quantized engine benchmark on a tiny model stores fewer bytes; bad values and
unsupported combinations are one `error:` line."""

from __future__ import annotations

import json

import pytest
from cli_cases import run, saved_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return saved_model(tmp_path_factory, "cli-engine-quant", head_dim=64)


def test_bench_engine_at_4_bits_stores_fewer_bytes(folder, capsys):
    rows = {}
    for bits in ("16", "4"):
        argv = ["bench-engine", "--model", folder, "--policies", "full", "--num-prompts", "2", "--prompt-len", "150",
                "--output-len", "3", "--kv-memory", "8MiB", "--dtype", "bf16", "--kv-bits", bits, "--kv-group", "64",
                "--kv-residual", "16", "--json"]  # fmt: skip
        code, out, err = run(argv, capsys)
        assert code == 0, err
        (rows[bits],) = json.loads(out)
        assert rows[bits]["kv_bits"] == int(bits) and rows[bits]["preemptions"] == 0
    # The peak is the bf16 prompt before it is quantized in both; it is not larger at 4 bits.
    assert rows["4"]["kv_bytes_stored_peak"] <= rows["16"]["kv_bytes_stored_peak"] * 1.05


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench-engine", "--kv-bits", "3"], "kv bits must be one of"),
        (["bench-engine", "--kv-bits", "4", "--kv-group", "0"], "kv group"),
        (["bench-engine", "--kv-bits", "4", "--kv-residual", "-2"], "kv residual"),
        (["bench-engine", "--kv-bits", "4", "--compress-chunks"], "compress-chunks"),
        (["serve", "--kv-bits", "5"], "kv bits must be one of"),
        (["serve", "--kv-bits", "2", "--kv-group", "5000"], "kv group"),
        (["serve", "--kv-bits", "8", "--compress-chunks"], "compress-chunks"),
    ],
)
def test_bad_quantization_flags_are_one_error_line(argv, needle, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith("error:") and needle in err and len(err.strip().splitlines()) == 1
