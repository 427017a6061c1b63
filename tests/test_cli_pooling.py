"""--pooling, --kernel and --ada-pool-kernel on generate, eval and bench: a bad value is
one `error:` line, and a good one reaches the policies the command builds."""

from __future__ import annotations

import pytest

import kvsqueeze.bench.runner
import kvsqueeze.eval.runner
import kvsqueeze.hf.generate
from kvsqueeze.cli import main
from kvsqueeze.errors import KVSqueezeError

MODEL = "tiny-random-llama"
BASE = {
    "generate": ["--model", MODEL, "--policy", "ada-snapkv", "--keep", "0.5", "--prompt", "hello " * 10],
    "eval": ["--model", MODEL, "--policies", "ada-snapkv", "--keep", "0.5", "--lengths", "300"],
    "bench": ["--model", MODEL, "--policies", "ada-snapkv", "--keep", "0.5", "--context", "200"],
}
SETTINGS = ["--pooling", "max", "--kernel", "3", "--ada-pool-kernel", "1"]


def run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("command", list(BASE))
@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--pooling", "mean", "'mean' is not one of"),
        ("--kernel", "4", "kernel must be odd"),
        ("--kernel", "0", "greater than or equal to 1"),
        ("--ada-pool-kernel", "2", "Ada-KV pooling kernel must be odd"),
    ],
)
def test_a_bad_pooling_value_is_one_error_line(command, flag, value, message, capsys, tmp_path):
    argv = [command, *BASE[command], flag, value] + (["--out", str(tmp_path)] if command == "eval" else [])
    code, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def check(policy) -> None:
    assert (policy.scorer.pool, policy.scorer.kernel, policy.allocator.pool_kernel) == ("max", 3, 1)


def test_the_settings_reach_the_policies(monkeypatch, capsys, tmp_path):
    seen = {}

    def stop(name):
        def record(*args, **kwargs):
            seen[name] = (args, kwargs)
            raise KVSqueezeError("stopped by the test")

        return record

    monkeypatch.setattr(kvsqueeze.hf.generate, "generate", stop("generate"))
    monkeypatch.setattr(kvsqueeze.eval.runner, "run_eval", stop("eval"))
    monkeypatch.setattr(kvsqueeze.bench.runner, "run_bench", stop("bench"))
    for command, base in BASE.items():
        out = ["--out", str(tmp_path)] if command == "eval" else []
        code, err = run([command, *base, *SETTINGS, *out], capsys)
        assert code == 2 and "stopped by the test" in err, err

    check(seen["generate"][0][2])  # generate(model, tokenizer, policy, ...)
    config = seen["eval"][0][0]
    assert {k: config.settings()[k] for k in ("pooling", "kernel", "ada_pool_kernel")} == {
        "pooling": "max",
        "kernel": 3,
        "ada_pool_kernel": 1,
    }
    check(config.policy_grid()[-1])
    assert seen["bench"][0][-1] == {"pooling": "max", "kernel": 3, "ada_pool_kernel": 1}
    from kvsqueeze.policy import make_policy

    check(make_policy("ada-snapkv", keep=0.5, **seen["bench"][0][-1]))
