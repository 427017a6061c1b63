"""Every flag of every subcommand fed empty, negative, huge and wrong-type values:
the answer is exit code 2 and one `error:` line, or (for a value that is in fact
valid) a normal run; never a traceback. Runs through the console entry point's
`main`, in-process, on a tiny random model with small sizes so valid runs are quick."""

from __future__ import annotations

import pytest

from kvsqueeze.cli import main

MODEL = "tiny-random-llama"
EMPTY, NEGATIVE, HUGE, WORD = "", "-7", str(10**30), "abc"
BAD_NUMBERS = (EMPTY, NEGATIVE, HUGE, WORD, "nan", "1e400")

# A quick valid call of each subcommand; each case overrides one flag of it.
BASE = {
    "generate": {"--model": MODEL, "--policy": "snapkv", "--keep": "0.5", "--prompt": "hello " * 20,
                 "--max-new-tokens": "2"},
    "demo": {"--model": MODEL, "--context": "300", "--keep": "0.5"},
    "bench": {"--model": MODEL, "--policies": "snapkv", "--keep": "0.5", "--context": "200", "--new-tokens": "2"},
    "eval": {"--model": MODEL, "--task": "needle", "--policies": "snapkv", "--keep": "0.5", "--lengths": "300",
             "--depths": "0.5"},
}  # fmt: skip

# Flags and the values fed to each; names and paths get their own bad values.
TEXT = (EMPTY, WORD, "-", "\x00")
FLAGS = {
    "generate": {
        "--model": (*TEXT, "random:nope", "tiny-random-"),
        "--policy": (*TEXT, "ada-", "full,snapkv"),
        "--keep": BAD_NUMBERS,
        "--tokens": BAD_NUMBERS,
        "--window": BAD_NUMBERS,
        "--alpha": BAD_NUMBERS,
        "--prompt-file": (EMPTY, "/", "/dev/null", "/proc/self/cmdline"),
        "--max-new-tokens": BAD_NUMBERS,
        "--device": (EMPTY, WORD, "cuda:9"),
        "--dtype": (EMPTY, WORD, "int8"),
    },
    "demo": {
        "--model": (*TEXT, "random:nope"),
        "--context": BAD_NUMBERS,
        "--keep": BAD_NUMBERS,
        "--device": (EMPTY, WORD),
        "--dtype": (EMPTY, WORD),
    },
    "bench": {
        "--model": (*TEXT, "random:nope"),
        "--policies": (*TEXT, ",", " , "),
        "--keep": BAD_NUMBERS,
        "--tokens": BAD_NUMBERS,
        "--context": BAD_NUMBERS,
        "--batch": BAD_NUMBERS,
        "--new-tokens": BAD_NUMBERS,
        "--device": (EMPTY, WORD),
        "--dtype": (EMPTY, WORD),
    },
    "eval": {
        "--model": (*TEXT, "random:nope"),
        "--task": (*TEXT,),
        "--policies": (*TEXT, ","),
        "--keep": (*BAD_NUMBERS, "0.5,abc", ","),
        "--tokens": (*BAD_NUMBERS, "5,abc"),
        "--lengths": (*BAD_NUMBERS, ","),
        "--depths": (*BAD_NUMBERS, ","),
        "--samples": BAD_NUMBERS,
        "--seed": (EMPTY, HUGE, WORD, "-1" + "0" * 30),
        "--data": (EMPTY, "/", "/dev/null"),
        "--window": BAD_NUMBERS,
        "--alpha": BAD_NUMBERS,
        "--dtype": (EMPTY, WORD),
        "--device": (EMPTY, WORD),
    },
}

CASES = [(cmd, flag, value) for cmd, flags in FLAGS.items() for flag, values in flags.items() for value in values]


def run(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, stderr) of `kvsqueeze ARGV`; any exception that escapes fails the test."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command, flag, value", CASES, ids=[f"{c}{f}={v!r}" for c, f, v in CASES])
def test_bad_value_gets_one_error_line(command, flag, value, tmp_path, capsys):
    options = {**BASE[command], flag: value}
    if command == "eval":
        options["--out"] = str(tmp_path / "out")
    argv = [command, *(part for pair in options.items() for part in pair)]
    code, err = run(argv, capsys)
    assert "Traceback" not in err
    assert code in (0, 2), f"exit {code}: {err}"
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", MODEL, "--prompt", "x", "--window", "-7"],
        ["generate", "--model", MODEL, "--prompt", "x", "--max-new-tokens", HUGE],
        ["generate", "--model", MODEL, "--prompt", "x", "--dtype", "int8"],
        ["bench", "--model", MODEL, "--policies", ""],
        ["bench", "--model", MODEL, "--batch", HUGE],
        ["demo", "--model", MODEL, "--context", HUGE],
        ["eval", "--model", MODEL, "--samples", HUGE, "--keep", "0.5", "--lengths", "300"],
        ["eval", "--model", MODEL, "--seed", HUGE, "--keep", "0.5", "--lengths", "300"],
    ],
)
def test_clearly_bad_values_are_rejected(argv, capsys, tmp_path):
    """Values no run can use: exit 2, not a run and not a traceback."""
    if argv[0] == "eval":
        argv = [*argv, "--out", str(tmp_path / "out")]
    code, err = run(argv, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
