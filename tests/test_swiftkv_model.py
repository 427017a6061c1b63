"""SwiftKV (arXiv 2410.03960) on tiny random Llama models: conversion, the SingleInputKV
forward against an independent reference, AcrossKV sharing, cached decoding and the
checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.hf.models import load_model
from kvsqueeze.hf.skinny_linears import use_skinny_linears
from kvsqueeze.hf.tiny import byte_tokenizer, tiny_model
from kvsqueeze.swiftkv import SwiftKVLlamaForCausalLM, convert

LAYERS = 6
ATOL = 1e-5


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama", num_layers=LAYERS)


def perturbed(model, kv_layer: int, across_group: int = 1) -> SwiftKVLlamaForCausalLM:
    """A converted model whose new weights moved off their initialisation, as after training."""
    swift = convert(model, kv_layer=kv_layer, across_group=across_group)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in swift.model.swiftkv.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return swift


def reference_logits(swift: SwiftKVLlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Every layer on every token, written out with plain tensor ops; layers >= l take
    K/V from their leader's rows of the SingleInputKV projection of layer l's input."""
    config, body = swift.config, swift.model
    t = ids.shape[1]
    x = body.embed_tokens(ids)
    cos, sin = body.rotary_emb(x, torch.arange(t)[None])
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    leaders = config.kv_leaders()
    kv_dim = config.num_key_value_heads * config.head_dim

    def heads(y: torch.Tensor) -> torch.Tensor:
        return y.view(1, t, -1, config.head_dim).transpose(1, 2)

    x_l = None
    for j, layer in enumerate(body.layers):
        attn = layer.self_attn
        if j == config.swiftkv_kv_layer:
            x_l = body.swiftkv.norm(x)
        h = layer.input_layernorm(x)
        if x_l is None:
            k, v = attn.k_proj(h), attn.v_proj(h)
        else:
            i = leaders.index(config.kv_leader(j))
            rows = body.swiftkv.kv_proj.weight[2 * i * kv_dim : (2 * i + 2) * kv_dim]
            k, v = (x_l @ rows.T).split(kv_dim, dim=-1)
        q, k = apply_rotary_pos_emb(heads(attn.q_proj(h)), heads(k), cos, sin)
        group = config.num_attention_heads // config.num_key_value_heads
        scores = (q @ repeat_kv(k, group).transpose(-1, -2)) * attn.scaling
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = (probs @ repeat_kv(heads(v), group)).transpose(1, 2).reshape(1, t, -1)
        x = x + attn.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return swift.lm_head(body.norm(x))


def test_nothing_skipped_equals_the_original_exactly(llama):
    ids = torch.randint(3, 259, (2, 33))
    swift = convert(llama, kv_layer=LAYERS)
    assert swift.model.swiftkv is None
    assert torch.equal(swift(ids).logits, llama(ids).logits)
    plain = llama.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(swift.generate(ids, max_new_tokens=8, do_sample=False), plain)


@pytest.mark.parametrize("across_group", [1, 2, 4])
def test_single_input_kv_prefill_equals_the_reference(llama, across_group):
    swift = perturbed(llama, kv_layer=2, across_group=across_group)
    ids = torch.randint(3, 259, (1, 29))
    with torch.no_grad():
        reference = reference_logits(swift, ids)
        every_token = swift(ids).logits
        last_only = swift(ids, logits_to_keep=1, cache=DynamicCache(config=swift.config)).logits
        last_four = swift(ids, logits_to_keep=4, cache=DynamicCache(config=swift.config)).logits
    torch.testing.assert_close(every_token, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(last_only, reference[:, -1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(last_four, reference[:, -4:], atol=ATOL, rtol=0)
    assert not torch.allclose(reference, llama(ids).logits, atol=1e-2)  # the new K/V matter


def test_initial_projection_is_each_layers_own(llama):
    """Before training, layer j's SingleInputKV K/V are its own k/v_proj of its own norm of
    layer l's input; an AcrossKV leader starts from its group's mean."""
    x = torch.randn(1, 5, llama.config.hidden_size)
    kv_dim = llama.config.num_key_value_heads * llama.config.head_dim
    for group in (1, 2):
        swift = convert(llama, kv_layer=2, across_group=group)
        projected = swift.model.swiftkv.kv_proj(swift.model.swiftkv.norm(x)).split(kv_dim, dim=-1)
        for i, leader in enumerate(swift.config.kv_leaders()):
            layers = [llama.model.layers[j] for j in range(leader, min(leader + group, LAYERS))]
            own_k = torch.stack([lay.self_attn.k_proj(lay.input_layernorm(x)) for lay in layers]).mean(0)
            own_v = torch.stack([lay.self_attn.v_proj(lay.input_layernorm(x)) for lay in layers]).mean(0)
            torch.testing.assert_close(projected[2 * i], own_k, atol=ATOL, rtol=0)
            torch.testing.assert_close(projected[2 * i + 1], own_v, atol=ATOL, rtol=0)


def test_prefill_skip_with_left_padding(llama):
    swift = perturbed(llama, kv_layer=3)
    tok = byte_tokenizer()
    batch = tok(["a short prompt", "a somewhat longer prompt, padded less"], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = swift(**batch).logits[:, -1]
        last = swift(**batch, logits_to_keep=1, cache=DynamicCache(config=swift.config)).logits[:, -1]
    torch.testing.assert_close(last, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("across_group", [1, 2])
def test_cached_decoding_equals_recomputing_every_token(llama, across_group):
    """generate() (prefill skipping, then one token at a time through every layer, with a
    cache) picks the tokens a cache-free forward over the whole sequence picks."""
    swift = perturbed(llama, kv_layer=3, across_group=across_group)
    ids = torch.randint(3, 259, (1, 21))
    out = swift.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            nxt = swift(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_across_kv_group_reads_one_stored_entry(llama):
    seen: dict[int, torch.Tensor] = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen[module.layer_idx] = key
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("swiftkv_recording", recording)
    swift = perturbed(llama, kv_layer=2, across_group=2)  # groups {2, 3}, {4, 5}
    swift.set_attn_implementation("swiftkv_recording")
    cache = DynamicCache(config=swift.config)
    with torch.no_grad():
        swift(torch.randint(3, 259, (1, 17)), cache=cache, logits_to_keep=1)
    assert seen[3] is seen[2] and seen[5] is seen[4]
    assert not torch.equal(seen[2], seen[4])
    stored = [j for j, layer in enumerate(cache.layers) if layer.is_initialized]
    assert stored == [0, 1, 2, 4]
    assert seen[2].shape[2] == 17  # keys of every prompt token, queries of the last only


def test_checkpoint_round_trip(llama, tmp_path):
    swift = perturbed(llama, kv_layer=2, across_group=2)
    swift.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is SwiftKVLlamaForCausalLM
    assert (loaded.config.swiftkv_kv_layer, loaded.config.swiftkv_across_group) == (2, 2)
    via_cli_loader, _ = load_model(str(tmp_path))
    ids = torch.randint(3, 259, (1, 19))
    with torch.no_grad():
        expected = swift(ids).logits
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)
        # load_model's linears take the skinny kernel for few rows (hf/skinny_linears.py): the
        # same checkpoint with the same swap gives the same bits.
        torch.testing.assert_close(via_cli_loader(ids).logits, use_skinny_linears(loaded)(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kv_layer=0), "kv-layer"),
        (dict(kv_layer=LAYERS + 1), "kv-layer"),
        (dict(across_group=3), "across-kv"),
    ],
)
def test_bad_conversion_arguments(llama, kwargs, message):
    with pytest.raises(KVSqueezeError, match=message):
        convert(llama, **kwargs)


def test_only_llama_converts():
    with pytest.raises(KVSqueezeError, match="qwen2"):
        convert(tiny_model("qwen2", num_layers=2))
