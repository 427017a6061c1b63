"""SwiftKV models with KVSqueezeCache and every policy: eviction applies to the SwiftKV
layers too, an AcrossKV group is stored (and counted) once, and the upper layers, which
run only the last prompt tokens, still score with the policy's full observation window."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.generate import generate
from kvsqueeze.hf.models import load_model
from kvsqueeze.hf.tiny import byte_tokenizer, tiny_model
from kvsqueeze.policy import make_policy, policy_names
from kvsqueeze.swiftkv import SwiftKVLlamaForCausalLM, convert

LAYERS, KV_LAYER = 6, 3
PROMPT = 64
WINDOW = 8


@pytest.fixture(scope="module")
def swift_models() -> dict[int, SwiftKVLlamaForCausalLM]:
    """Converted models with trained-looking (moved off their start) SwiftKV weights, per AcrossKV group."""
    llama = tiny_model("llama", num_layers=LAYERS)
    models = {}
    for group in (1, 2):
        swift = convert(llama, kv_layer=KV_LAYER, across_group=group)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in swift.model.swiftkv.parameters():
                p.add_(0.05 * torch.randn_like(p))
        models[group] = swift
    return models


def prompt() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randint(3, 259, (1, PROMPT))


def run(model, policy, ids: torch.Tensor, new: int = 6, **kwargs) -> tuple[torch.Tensor, KVSqueezeCache]:
    cache = KVSqueezeCache(model, policy)
    with cache, torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out, cache


@pytest.mark.parametrize("group", [1, 2])
def test_keep_all_equals_plain_generation(swift_models, group):
    model, ids = swift_models[group], prompt()
    plain = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=8, do_sample=False)
    out, _ = run(model, make_policy("full"), ids, new=8)
    assert torch.equal(out, plain)


# kvzip scores by a context reconstruction that generate() alone does not run (kvsqueeze.hf.kvzip).
GENERATE_POLICIES = [n for n in policy_names() if n != "full" and "kvzip" not in n]


@pytest.mark.parametrize("name", GENERATE_POLICIES)
def test_every_policy_evicts_and_a_shared_layer_is_stored_once(swift_models, name):
    ids = prompt()
    model = swift_models[2]  # leaders 3 and 5: layer 4 reads layer 3's entry
    out, cache = run(model, make_policy(name, keep=0.5, window=WINDOW), ids)
    assert out.shape[1] == PROMPT + 6
    stored = [i for i, layer in enumerate(cache.layers) if layer.compressed.store is not None]
    assert stored == [0, 1, 2, 3, 5]
    kept = cache.kept_tokens_per_head()
    assert len(kept) == len(stored)
    if name.startswith("cross-"):  # one ranking over all layers: a layer may keep everything, the total may not
        assert sum(map(sum, kept)) < len(stored) * 2 * PROMPT
    else:
        assert all(sum(heads) < 2 * PROMPT for heads in kept)  # half of each layer
    per_token = 2 * model.config.num_key_value_heads * model.config.head_dim * 4  # fp32 keys + values
    seen = PROMPT + 6 - 1  # the last new token is never fed back
    assert cache.full_nbytes == len(stored) * seen * per_token
    # Bytes held are the stored layers' own tensors: compressed, so well under the full cache's.
    assert cache.nbytes == sum(layer.compressed.nbytes for layer in cache.layers)
    assert cache.nbytes < 0.8 * cache.full_nbytes


def test_across_kv_2_holds_five_sixths_of_the_bytes(swift_models):
    """Six layers, l = 3, groups of 2: layers 0-3 and 5 hold entries, so 5/6 of the bytes."""
    ids = prompt()
    _, shared = run(swift_models[2], make_policy("full"), ids)
    _, single = run(swift_models[1], make_policy("full"), ids)
    shared.trim(), single.trim()
    assert shared.nbytes * 6 == single.nbytes * 5


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "tova", "pyramidkv"])
def test_upper_layers_keep_what_a_full_prefill_would_keep(swift_models, name):
    """The upper layers run only the last `window` prompt tokens, yet keep exactly the
    entries a prefill that ran every token through them keeps (scorers read the window)."""
    model, ids = swift_models[2], prompt()
    policy = make_policy(name, keep=0.3, window=WINDOW)
    kept = []
    for logits_to_keep in (1, 0):  # 1: skip the upper layers for early prompt tokens; 0: run them all
        cache = KVSqueezeCache(model, policy)
        with cache, torch.no_grad():
            logits = model(ids, past_key_values=cache, logits_to_keep=logits_to_keep).logits[:, -1]
        positions = [layer.compressed.store.positions.clone() for layer in cache.layers if layer.is_initialized]
        kept.append((logits, positions))
    (skip_logits, skip_positions), (full_logits, full_positions) = kept
    torch.testing.assert_close(skip_logits, full_logits, atol=1e-5, rtol=0)
    assert len(skip_positions) == 5
    for a, b in zip(skip_positions, full_positions, strict=True):
        assert torch.equal(a, b)


def test_generate_from_a_checkpoint_folder(swift_models, tmp_path):
    """What `kvsqueeze generate --model DIR` runs: a saved SwiftKV folder with a compressing policy."""
    swift_models[2].save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path))
    result = generate(model, tokenizer, make_policy("ada-snapkv", keep=0.25, window=WINDOW), "word " * 40, "Q?")
    assert result.new_tokens > 0
    assert len(result.kept_tokens_per_head) == 5
    assert result.kv_bytes_stored < 0.5 * result.kv_bytes_full


def test_one_recorded_prefill_replays_into_the_same_caches(swift_models):
    """What `kvsqueeze eval` does: record the prefill once, then compress it per policy;
    the AcrossKV layers that store nothing are skipped, and the result equals a fresh run."""
    from kvsqueeze.hf.prefill import record_prefill

    model, ids = swift_models[2], prompt()
    policy = make_policy("ada-snapkv", keep=0.4, window=WINDOW)
    replayed = record_prefill(model, ids).cache(model, policy)
    fresh = KVSqueezeCache(model, policy)
    with fresh, torch.no_grad():
        model(ids, past_key_values=fresh, logits_to_keep=1)
    pairs = [(a.compressed.store, b.compressed.store) for a, b in zip(replayed.layers, fresh.layers, strict=True)]
    assert [a is None for a, _ in pairs] == [b is None for _, b in pairs] == [False] * 4 + [True, False]
    for a, b in pairs:
        if a is not None:
            assert torch.equal(a.positions, b.positions)
            torch.testing.assert_close(a.keys, b.keys)
