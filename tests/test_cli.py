"""The `kvsqueeze generate` command line, on tiny random models (fast).

The contract: `kvsqueeze generate --model MODEL --policy NAME [--keep R | --tokens N]
[--window W] [--alpha A] [--prompt TEXT | --prompt-file FILE] [--question TEXT]
[--max-new-tokens N] [--chat] [--json]`. With --json it prints one JSON object; bad
input gets exactly one line "error: ..." on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvsqueeze.cli import app
from kvsqueeze.hf.models import load_model

MODEL = "tiny-random-llama"
TINY_MODELS = ["tiny-random-llama", "tiny-random-qwen2", "tiny-random-mistral"]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 bytes = 360 tokens (byte tokenizer)
QUESTION = "What does the fox jump over?"
FIELDS = {
    "text": str,
    "prompt_tokens": int,
    "new_tokens": int,
    "kv_bytes_full": int,
    "kv_bytes_stored": int,
    "kept_tokens_per_head": list,
    "prefill_seconds": float,
    "decode_tokens_per_second": float,
}


def _runner() -> CliRunner:
    """A runner that keeps stderr apart from stdout, for any click version."""
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()  # click >= 8.2 always separates result.stderr


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return _runner()


@pytest.fixture(scope="module")
def tiny():
    """(config, tokenizer) of the tiny model, to check the CLI's numbers against."""
    model, tokenizer = load_model(MODEL)
    return model.config, tokenizer


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, ["generate", *args])


def run_json(runner: CliRunner, *args: str, model: str = MODEL, max_new_tokens: int = 4) -> dict:
    result = invoke(runner, "--model", model, "--max-new-tokens", str(max_new_tokens), "--json", *args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f"--json must print exactly one line, got {result.stdout!r}"
    return json.loads(lines[0])


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def bytes_per_token(config) -> int:
    """Bytes of K and V of one token over all layers and kv heads (float32)."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4


def check_shape(kept, config) -> None:
    assert len(kept) == config.num_hidden_layers
    for layer in kept:
        assert len(layer) == config.num_key_value_heads
        assert all(isinstance(k, int) and k >= 0 for k in layer)


# ----------------------------------------------------------------------------- --json


@pytest.mark.parametrize("model", TINY_MODELS)
def test_json_has_all_fields_with_sensible_values(runner, tiny, model):
    config, tokenizer = tiny
    max_new = 6
    out = run_json(
        runner, "--policy", "snapkv", "--keep", "0.25", "--prompt", PROMPT, model=model, max_new_tokens=max_new
    )
    for field, kind in FIELDS.items():
        assert field in out, f"missing field {field!r}"
        assert isinstance(out[field], kind), f"{field} is {type(out[field]).__name__}, not {kind.__name__}"

    prompt_tokens = out["prompt_tokens"]
    assert prompt_tokens == len(tokenizer(PROMPT)["input_ids"]) == len(PROMPT.encode())
    assert 1 <= out["new_tokens"] <= max_new
    assert out["prefill_seconds"] > 0
    assert out["decode_tokens_per_second"] >= 0
    if out["new_tokens"] > 1:
        assert out["decode_tokens_per_second"] > 0

    kept = out["kept_tokens_per_head"]
    check_shape(kept, config)
    for layer in kept:
        for k in layer:
            assert abs(k - 0.25 * prompt_tokens) <= 1, kept

    per_token = bytes_per_token(config)
    # The full cache would hold every prompt token (and maybe the decoded ones).
    assert prompt_tokens * per_token <= out["kv_bytes_full"] <= (prompt_tokens + max_new) * per_token
    # Stored: at least the kept K/V, and far below the full cache.
    kept_bytes = sum(map(sum, kept)) * per_token // (config.num_hidden_layers * config.num_key_value_heads)
    assert kept_bytes <= out["kv_bytes_stored"] < out["kv_bytes_full"]
    assert out["kv_bytes_stored"] < 0.5 * out["kv_bytes_full"]


def test_json_full_policy_keeps_everything(runner, tiny):
    config, _ = tiny
    out = run_json(runner, "--policy", "full", "--prompt", PROMPT)
    check_shape(out["kept_tokens_per_head"], config)
    assert all(k == out["prompt_tokens"] for layer in out["kept_tokens_per_head"] for k in layer)
    assert out["kv_bytes_stored"] >= out["kv_bytes_full"]


def test_json_ada_policy_reallocates_within_each_layer(runner, tiny):
    config, _ = tiny
    out = run_json(runner, "--policy", "ada-snapkv", "--keep", "0.25", "--prompt", PROMPT)
    budget = round(0.25 * out["prompt_tokens"])
    check_shape(out["kept_tokens_per_head"], config)
    for layer in out["kept_tokens_per_head"]:
        assert sum(layer) == budget * config.num_key_value_heads  # same total as uniform
        assert min(layer) >= int(0.2 * budget)  # the default safeguard alpha = 0.2


def test_alpha_one_makes_ada_uniform(runner):
    out = run_json(runner, "--policy", "ada-snapkv", "--keep", "0.25", "--alpha", "1.0", "--prompt", PROMPT)
    budget = round(0.25 * out["prompt_tokens"])
    assert all(k == budget for layer in out["kept_tokens_per_head"] for k in layer)


def test_plain_output_text_on_stdout_summary_on_stderr(runner):
    result = invoke(runner, "--model", MODEL, "--policy", "snapkv", "--prompt", PROMPT, "--max-new-tokens", "3")
    assert result.exit_code == 0, (result.stderr, result.exception)
    summary = result.stderr.strip()
    assert "snapkv" in summary and "prompt 360 tok" in summary and "MiB" in summary
    assert "{" not in result.stdout  # the text, not JSON


# ----------------------------------------------------------------------------- options


def test_prompt_file_gives_the_same_run_as_prompt(runner, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT, encoding="utf-8")
    from_text = run_json(runner, "--policy", "snapkv", "--keep", "0.5", "--prompt", PROMPT)
    from_file = run_json(runner, "--policy", "snapkv", "--keep", "0.5", "--prompt-file", str(path))
    for field in ("text", "prompt_tokens", "new_tokens", "kv_bytes_full", "kv_bytes_stored", "kept_tokens_per_head"):
        assert from_file[field] == from_text[field], field


def test_tokens_budget_keeps_that_many_per_head(runner, tiny):
    config, _ = tiny
    out = run_json(runner, "--policy", "snapkv", "--tokens", "40", "--window", "8", "--prompt", PROMPT)
    check_shape(out["kept_tokens_per_head"], config)
    assert all(k == 40 for layer in out["kept_tokens_per_head"] for k in layer)
    assert out["kv_bytes_stored"] < out["kv_bytes_full"]


def test_tokens_budget_larger_than_prompt_keeps_the_prompt(runner):
    out = run_json(runner, "--policy", "snapkv", "--tokens", "100000", "--prompt", "a short prompt")
    assert all(k == out["prompt_tokens"] for layer in out["kept_tokens_per_head"] for k in layer)


def test_chat_wraps_the_prompt_in_the_template(runner, tiny):
    _, tokenizer = tiny
    out = run_json(runner, "--policy", "snapkv", "--keep", "0.5", "--prompt", PROMPT, "--chat")
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    assert templated != PROMPT
    assert out["prompt_tokens"] == n_tokens(tokenizer, templated)
    assert 1 <= out["new_tokens"] <= 4


def test_chat_with_question(runner, tiny):
    _, tokenizer = tiny
    out = run_json(runner, "--policy", "snapkv", "--keep", "0.5", "--prompt", PROMPT, "--question", QUESTION, "--chat")
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{PROMPT}\n\n{QUESTION}"}], tokenize=False, add_generation_prompt=True
    )
    assert out["prompt_tokens"] == n_tokens(tokenizer, templated)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_question_aware_and_agnostic(runner, tiny, chat):
    _, tokenizer = tiny
    args = ["--policy", "snapkv", "--keep", "0.25", "--prompt", PROMPT, "--question", QUESTION]
    args += ["--chat"] if chat else []
    aware = run_json(runner, *args)
    agnostic = run_json(runner, *args, "--question-agnostic")
    context, question = n_tokens(tokenizer, PROMPT), n_tokens(tokenizer, QUESTION)
    if chat:  # the context part then also holds the template's text before the prompt
        templated = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{PROMPT}\n\n{QUESTION}"}], tokenize=False, add_generation_prompt=True
        )
        context = n_tokens(tokenizer, templated[: templated.index(PROMPT) + len(PROMPT)])

    # The question is part of the prompt either way.
    assert aware["prompt_tokens"] == agnostic["prompt_tokens"] >= context + question
    assert aware["question_aware"] is True
    assert agnostic["question_aware"] is False
    # Question-aware compresses context + question; question-agnostic compresses the
    # context alone, before the question is seen (the question is appended afterwards).
    for layer in aware["kept_tokens_per_head"]:
        assert all(abs(k - 0.25 * aware["prompt_tokens"]) <= 1 for k in layer)
    for layer in agnostic["kept_tokens_per_head"]:
        assert all(abs(k - 0.25 * context) <= 1 for k in layer)
    for out in (aware, agnostic):
        assert out["kv_bytes_stored"] < out["kv_bytes_full"]


def test_help_lists_the_contract_options(runner):
    result = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0
    for option in (
        "--model",
        "--policy",
        "--keep",
        "--tokens",
        "--window",
        "--alpha",
        "--prompt",
        "--prompt-file",
        "--question",
        "--question-agnostic",
        "--max-new-tokens",
        "--chat",
        "--json",
    ):
        assert option in result.stdout, option


# ----------------------------------------------------------------------------- bad input

GOOD = ["--model", MODEL, "--policy", "snapkv", "--keep", "0.25", "--max-new-tokens", "2"]


def _too_long(tmp_path: Path) -> list[str]:
    path = tmp_path / "long.txt"
    path.write_text("x" * 9000, encoding="utf-8")  # 9000 tokens > the tiny model's 8192 positions
    return ["--model", MODEL, "--policy", "snapkv", "--prompt-file", str(path)]


def _empty_file(tmp_path: Path) -> list[str]:
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    return ["--model", MODEL, "--prompt-file", str(path)]


# (id, args built from tmp_path, words the one-line message must contain)
BAD_INPUT = [
    (
        "unknown-policy",
        lambda t: ["--model", MODEL, "--policy", "no-such-policy", "--prompt", PROMPT],
        ["no-such-policy"],
    ),
    ("keep-0", lambda t: [*GOOD[:4], "--keep", "0", "--prompt", PROMPT], ["keep", "0"]),
    ("keep-1.5", lambda t: [*GOOD[:4], "--keep", "1.5", "--prompt", PROMPT], ["keep", "1.5"]),
    ("tokens-negative", lambda t: [*GOOD[:4], "--tokens", "-5", "--prompt", PROMPT], ["-5"]),
    ("tokens-0", lambda t: [*GOOD[:4], "--tokens", "0", "--prompt", PROMPT], ["token"]),
    ("keep-and-tokens", lambda t: [*GOOD, "--tokens", "10", "--prompt", PROMPT], ["--keep", "--tokens"]),
    ("empty-prompt", lambda t: [*GOOD, "--prompt", ""], ["empty"]),
    ("blank-prompt", lambda t: [*GOOD, "--prompt", "  \n\t "], ["empty"]),
    ("empty-prompt-file", _empty_file, ["empty"]),
    ("prompt-too-long", _too_long, ["9000", "8192"]),
    ("missing-model-path", lambda t: ["--model", str(t / "no-such-model"), "--prompt", PROMPT], ["no-such-model"]),
    ("unknown-tiny-model", lambda t: ["--model", "tiny-random-gpt2", "--prompt", PROMPT], ["tiny-random-gpt2"]),
    ("missing-prompt-file", lambda t: [*GOOD, "--prompt-file", str(t / "no-such-file.txt")], ["no-such-file.txt"]),
    ("no-prompt", lambda t: GOOD, ["--prompt"]),
    ("prompt-and-file", lambda t: [*GOOD, "--prompt", PROMPT, "--prompt-file", str(t / "p.txt")], ["--prompt-file"]),
    ("max-new-tokens-0", lambda t: [*GOOD[:6], "--max-new-tokens", "0", "--prompt", PROMPT], ["max-new-tokens"]),
    ("window-negative", lambda t: [*GOOD, "--window", "-1", "--prompt", PROMPT], ["window"]),
    (
        "alpha-out-of-range",
        lambda t: ["--model", MODEL, "--policy", "ada-snapkv", "--alpha", "1.5", "--prompt", PROMPT],
        ["alpha", "1.5"],
    ),
]


def check_one_line_error(result, words) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), f"crashed with {result.exception!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {result.stderr!r}"
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    assert result.stdout == ""


@pytest.mark.parametrize("make_args, words", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_one_line_error(runner, tmp_path, make_args, words):
    result = invoke(runner, *make_args(tmp_path))
    check_one_line_error(result, words)
    assert result.exit_code == 2


def test_good_call_after_bad_calls_in_the_same_process(runner, tmp_path):
    for _, make_args, words in BAD_INPUT:
        check_one_line_error(invoke(runner, *make_args(tmp_path)), words)
    out = run_json(runner, "--policy", "ada-snapkv", "--keep", "0.25", "--prompt", PROMPT)
    assert out["prompt_tokens"] == 360
    assert out["kv_bytes_stored"] < out["kv_bytes_full"]
    # and the same call twice gives the same answer (no state leaks between calls)
    assert run_json(runner, "--policy", "ada-snapkv", "--keep", "0.25", "--prompt", PROMPT)["text"] == out["text"]


# ----------------------------------------------------------------------------- entry point


def console_script() -> str:
    path = Path(sys.executable).parent / "kvsqueeze"
    if not path.exists():
        pytest.fail(f"the console script {path} is not installed (pip install -e .)")
    return str(path)


def test_console_script_entry_point():
    script = console_script()
    args = [
        "generate",
        "--model",
        MODEL,
        "--policy",
        "snapkv",
        "--keep",
        "0.5",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "3",
        "--json",
    ]
    good = subprocess.run([script, *args], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    out = json.loads(good.stdout)
    assert out["prompt_tokens"] == 360 and 1 <= out["new_tokens"] <= 3
    assert out["kv_bytes_stored"] < out["kv_bytes_full"]

    bad = subprocess.run(
        [script, "generate", "--model", MODEL, "--policy", "nope", "--prompt", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("error: ") and "nope" in bad.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["generate", "--keep", "abc", "--prompt", "x"], "--keep"),
        (["generate", "--bogus"], "--bogus"),
        (["bench", "--batch", "two"], "--batch"),
    ],
)
def test_mistyped_arguments_get_one_error_line(args, named):
    """Usage errors from the argument parser follow the same one-line contract."""
    bad = subprocess.run([console_script(), *args], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0]


# ----------------------------------------------------------------------------- issue 8: CLI surface


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the console entry point, in-process."""
    from kvsqueeze.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--model", MODEL, "--policy", "snapkv", "--keep", "0.5", "--window", "0", "--prompt", PROMPT],
        ["eval", "--model", MODEL, "--policies", "snapkv", "--keep", "0.5", "--lengths", "300", "--window", "0"],
    ],
    ids=["generate", "eval"],
)
def test_window_zero_is_one_error_line(argv, capsys, tmp_path):
    if argv[0] == "eval":
        argv = [*argv, "--out", str(tmp_path / "out")]
    code, out, err = run_main(argv, capsys)
    assert_one_error_line(code, err, "window")
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_binary_prompt_file_error_names_the_file(capsys, tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    code, _, err = run_main(["generate", "--model", MODEL, "--prompt-file", str(path)], capsys)
    assert_one_error_line(code, err, "weights.bin")


def test_random_shape_models_work_in_generate(runner):
    out = run_json(runner, "--model", "random:smollm2-135m", "--max-new-tokens", "2", "--prompt", "hello there")
    assert out["prompt_tokens"] == 11 and out["new_tokens"] <= 2


def test_chat_is_a_flag_and_chat_true_is_an_error_line(runner, capsys):
    help_text = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200", "TERM": "dumb"}).stdout
    assert "--chat" in help_text and "--no-chat" in help_text
    # flags take no value, so none shows one (typer's own --help line is not ours to change)
    assert all("--help" in line for line in help_text.splitlines() if "<bool>" in line)
    code, _, err = run_main(["generate", "--model", MODEL, "--prompt", "x", "--chat", "true"], capsys)
    assert_one_error_line(code, err, "true")


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_policy_help_lists_the_policy_names(runner, command):
    from kvsqueeze.policy import policy_names

    help_text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERM": "dumb"}).stdout
    flat = " ".join(help_text.replace("│", " ").split())
    for name in policy_names():
        assert name in flat, name


def test_version(capsys):
    from kvsqueeze import __version__

    code, out, _ = run_main(["--version"], capsys)
    assert code == 0 and out.strip() == f"kvsqueeze {__version__}"


@pytest.mark.parametrize("command", ["generate", "demo", "eval", "bench"])
def test_every_model_command_has_device_and_dtype(runner, command):
    help_text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERM": "dumb"}).stdout
    for text in ("--device", "cpu", "cuda", "--dtype", "bf16", "fp16", "fp32"):
        assert text in help_text, (command, text)


def test_dtype_bf16_halves_the_cache(runner):
    fp32 = run_json(runner, "--dtype", "fp32", "--prompt", PROMPT, "--max-new-tokens", "2")
    bf16 = run_json(runner, "--dtype", "bf16", "--prompt", PROMPT, "--max-new-tokens", "2")
    assert bf16["kv_bytes_full"] * 2 == fp32["kv_bytes_full"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["generate", "demo", "bench", "eval"])
def test_cuda_without_a_device_is_one_error_line(command, capsys, tmp_path):
    argv = [command, "--model", MODEL, "--device", "cuda"]
    argv += {"generate": ["--prompt", "x"], "eval": ["--keep", "0.5", "--lengths", "300", "--out", str(tmp_path)]}.get(
        command, []
    )
    code, _, err = run_main(argv, capsys)
    assert_one_error_line(code, err, "cuda")


def test_policy_progress_names_the_policy_being_run():
    import io

    from rich.console import Console

    from kvsqueeze.cli.progress import policy_progress
    from kvsqueeze.policy import make_policy

    file = io.StringIO()
    console = Console(file=file, force_terminal=True, width=100)
    policies = [make_policy("snapkv", keep=0.5), make_policy("ada-tova", keep=0.5)]
    seen = []
    for policy in policy_progress(policies, console):
        seen.append((policy.name, file.getvalue().count(f"policy {policy.name}") > 0))
    assert seen == [("snapkv", True), ("ada-tova", True)]


# ----------------------------------------------------------------------------- issue 8: install weight and setup

ROOT = Path(__file__).resolve().parents[1]
EXTRA_ONLY = ("triton", "ray", "matplotlib", "rapidfuzz", "rouge_score")


def test_core_dependencies_leave_heavy_and_eval_packages_to_extras():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    for package in ("triton", "ray", "matplotlib", "rapidfuzz", "rouge-score"):
        assert package not in core, package
    extras = project["optional-dependencies"]
    assert {"gpu", "ray", "eval", "all", "dev"} <= extras.keys()
    assert any("triton" in d for d in extras["gpu"]) and any("ray" in d for d in extras["ray"])
    assert {"pytest", "ruff", "hypothesis"} <= {d.split("[")[0].split("=")[0] for d in extras["dev"]}


BLOCK_EXTRAS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from kvsqueeze.cli import main
main(sys.argv[1:])
"""


def test_generate_runs_without_any_extra():
    """A core install: generate imports none of triton, ray, matplotlib, rapidfuzz, rouge-score."""
    code = BLOCK_EXTRAS.format(blocked=set(EXTRA_ONLY))
    argv = ["generate", "--model", MODEL, "--prompt", PROMPT, "--max-new-tokens", "2", "--json"]
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prompt_tokens"] == 360


def test_eval_without_its_extra_names_the_extra(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rapidfuzz" else real(name, *a))
    argv = ["eval", "--model", MODEL, "--keep", "0.5", "--lengths", "300", "--out", str(tmp_path / "o")]
    code, _, err = run_main(argv, capsys)
    assert_one_error_line(code, err, "[eval]", "rapidfuzz")


def test_setup_script_announces_every_install():
    """Every pip install in scripts/setup.sh comes right after a line that says what it installs."""
    lines = [line.strip() for line in (ROOT / "scripts" / "setup.sh").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    installs = [i for i, line in enumerate(commands) if "pip install" in line]
    assert installs
    for i in installs:
        assert commands[i - 1].startswith("step "), commands[i]
