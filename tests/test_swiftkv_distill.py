"""SwiftKV distillation on a tiny random Llama and the essays: only the new projection
trains, the teacher is untouched, an interrupted run resumes to the same weights, and
`kvsqueeze distill` writes a loadable model folder and the curve PNG."""

from __future__ import annotations

import json

import pytest
import torch

from kvsqueeze.cli.main import main
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.hf.models import load_model
from kvsqueeze.hf.tiny import byte_tokenizer, tiny_model
from kvsqueeze.swiftkv.distill import CURVE_FILE, STATE_FILE, DistillConfig, distill, kd_loss

SEQ = 64


def config(steps: int) -> DistillConfig:
    return DistillConfig(
        kv_layer=2, across_group=2, tokens=steps * SEQ, seq_len=SEQ, lr=1e-2, eval_every=2 * SEQ, eval_tokens=SEQ,
        checkpoint_every=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_only_the_new_projection_trains(tokenizer, tmp_path):
    teacher = tiny_model("llama", num_layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = distill(teacher, tokenizer, config(4), tmp_path)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name  # the teacher is left as it was
    student = result.student.state_dict()
    moved = [k for k in student if not torch.equal(student[k], before.get(k, torch.empty(0)))]
    assert sorted(moved) == ["model.swiftkv.kv_proj.weight", "model.swiftkv.norm.weight"]
    losses = [p["loss"] for p in result.curve if "loss" in p]
    evals = [p["tokens"] for p in result.curve if "held_out_ppl" in p]
    assert len(losses) == 4 and evals == [0, 2 * SEQ, 4 * SEQ]
    assert {"config.json", "model.safetensors", STATE_FILE, CURVE_FILE} <= {p.name for p in tmp_path.iterdir()}
    loaded, _ = load_model(str(tmp_path))
    assert torch.equal(loaded.model.swiftkv.kv_proj.weight, result.student.model.swiftkv.kv_proj.weight)


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tokenizer, tmp_path):
    straight = distill(tiny_model("llama", num_layers=4), tokenizer, config(4), tmp_path / "a")
    distill(tiny_model("llama", num_layers=4), tokenizer, config(2), tmp_path / "b")  # "interrupted" after 2 steps
    resumed = distill(tiny_model("llama", num_layers=4), tokenizer, config(4), tmp_path / "b")
    assert resumed.curve == straight.curve
    for a, b in zip(resumed.student.parameters(), straight.student.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_with_other_settings_fails(tokenizer, tmp_path):
    distill(tiny_model("llama", num_layers=4), tokenizer, config(1), tmp_path)
    other = DistillConfig(**{**config(1).__dict__, "temperature": 1.0})
    with pytest.raises(KVSqueezeError, match="other settings"):
        distill(tiny_model("llama", num_layers=4), tokenizer, other, tmp_path)


def test_kd_loss_is_zero_only_on_matching_logits():
    logits = torch.randn(2, 5, 11)
    assert float(kd_loss(logits, logits, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(logits, torch.randn(2, 5, 11), 2.0)) > 0.01


@pytest.mark.parametrize(
    ("field", "value"), [("tokens", 0), ("seq_len", 0), ("held_out", 1.0), ("lr", 0.0), ("temperature", -1.0)]
)
def test_bad_settings_fail(field, value):
    with pytest.raises(KVSqueezeError):
        DistillConfig(**{field: value})


def test_cli_distill(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["distill", "--model", "tiny-random-llama", "--tokens", "128", "--seq-len", "64", "--eval-tokens", "64"]
    with pytest.raises(SystemExit) as exit_code:
        main([*args, "--across-kv", "1", "--out", str(out)])
    assert exit_code.value.code == 0
    assert "held-out perplexity" in capsys.readouterr().out
    assert (out / "curve.png").stat().st_size > 1000
    assert json.loads((out / CURVE_FILE).read_text())["teacher_ppl"] > 1.0
    with pytest.raises(SystemExit) as exit_code:
        main([*args, "--across-kv", "3", "--out", str(tmp_path / "bad")])
    assert exit_code.value.code == 2
    assert capsys.readouterr().err.strip() == "error: across-kv must be one of 1, 2, 4, got 3"
