"""Integration tests of KVSqueezeCache with real transformers models (tiny, random, GQA).

The key check is the oracle test: a compressed run must equal an uncompressed run
(plain DynamicCache, full K/V) whose attention masks out, per layer and per kv head,
exactly the prefill entries the compressed cache evicted.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsqueeze.hf import ATTENTION_NAME, KVSqueezeCache
from kvsqueeze.hf.attention import kvsqueeze_attention
from kvsqueeze.hf.kvzip import needs_reconstruction
from kvsqueeze.hf.tiny import tiny_model
from kvsqueeze.policy import make_policy, policy_names

ARCHS = ["llama", "qwen2", "mistral"]
LENGTHS = [40, 77, 120]  # a left-padded batch of prompts of different lengths
ATOL = 1e-4
ORACLE = "oracle_masked"

# --------------------------------------------------------------------------- oracle
# layer_idx -> kept[batch, kv_heads, prefill_slots] (bool); slots past the prefill
# (tokens added later) are always visible. Empty dict: nothing masked (plain attention).
_ORACLE_KEPT: dict[int, torch.Tensor] = {}


def oracle_mask(*args, **kwargs) -> torch.Tensor:
    """The sdpa boolean mask [batch, 1, q, kv] (causal + padding), always materialized."""
    kwargs["allow_is_causal_skip"] = False
    mask = sdpa_mask(*args, **kwargs)
    assert mask is not None and mask.dtype == torch.bool and mask.dim() == 4
    return mask


def oracle_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Dense attention over the full K/V, with evicted prefill entries masked out per kv head.
    (Causal, padding and any sliding window are already in transformers' sdpa mask.)"""
    b, hq, q_len, d = query.shape
    hkv, k_len = key.shape[1], key.shape[2]
    group = hq // hkv
    allowed = attention_mask.expand(b, hq, q_len, k_len)
    kept = _ORACLE_KEPT.get(module.layer_idx)
    if kept is not None:
        t = kept.shape[-1]
        per_kv_head = torch.cat([kept, kept.new_ones(b, hkv, k_len - t)], dim=-1)  # [b, hkv, k]
        per_q_head = per_kv_head.repeat_interleave(group, dim=1)  # q head i reads kv head i // group
        allowed = allowed & per_q_head[:, :, None, :]
    out = F.scaled_dot_product_attention(
        query,
        key.repeat_interleave(group, dim=1),
        value.repeat_interleave(group, dim=1),
        attn_mask=allowed,
        scale=scaling if scaling is not None else d**-0.5,
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ORACLE, oracle_attention)
AttentionMaskInterface.register(ORACLE, oracle_mask)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_grad_and_clean_oracle():
    _ORACLE_KEPT.clear()
    with torch.no_grad():
        yield
    _ORACLE_KEPT.clear()


# --------------------------------------------------------------------------- helpers
def make_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random byte-token prompts: (input_ids, attention_mask), both [b, max_len]."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.zeros(len(lengths), t, dtype=torch.long)
    am = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = torch.randint(3, 259, (n,), generator=g)
        am[i, t - n :] = 1
    return ids, am


def positions_from(am: torch.Tensor) -> torch.Tensor:
    """RoPE positions as generate() derives them from a left-padded mask."""
    return (am.cumsum(-1) - 1).clamp_min(0)


def kept_from_store(cache: KVSqueezeCache, batch: int, prefill_len: int) -> dict[int, torch.Tensor]:
    """Read back from each layer's FlatKV which (sequence, kv head, slot) it stores."""
    kept = {}
    for idx, layer in enumerate(cache.layers):
        kv, hkv = layer.compressed.store, layer.num_kv_heads
        assert kv.num_heads == batch * hkv  # batch folded into heads
        mask = torch.zeros(batch, hkv, prefill_len, dtype=torch.bool)
        for head in range(kv.num_heads):
            _, _, pos = kv.head(head)
            pos = pos.long()
            assert bool((pos >= 0).all()) and bool((pos < prefill_len).all())
            assert pos.unique().numel() == pos.numel()  # no slot stored twice
            mask[head // hkv, head % hkv, pos] = True
        assert torch.equal(mask.sum(-1), layer.compressed.kept_after_prefill.cpu())
        kept[idx] = mask
    return kept


def greedy(model, ids, am, cache, new_tokens: int) -> torch.Tensor:
    scope = cache if isinstance(cache, KVSqueezeCache) else contextlib.nullcontext()
    with scope:
        return model.generate(
            ids, attention_mask=am, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )


def plain_generate(model, ids, am, new_tokens: int, cache: DynamicCache | None = None) -> torch.Tensor:
    model.set_attn_implementation("sdpa")
    return greedy(model, ids, am, cache if cache is not None else DynamicCache(config=model.config), new_tokens)


def assert_matches_oracle(
    model, policy, ids, am, decode_steps: int = 4, question: torch.Tensor | None = None
) -> KVSqueezeCache:
    """Prefill with the compressed cache and with a plain one; then teacher-force the
    same tokens into both (first `question`, a multi-token chunk, if given) and
    require the compressed logits to equal the oracle's masked logits."""
    b, t = ids.shape
    real = am.bool()
    pos = positions_from(am)

    model.set_attn_implementation("sdpa")
    ref_cache = DynamicCache()  # full K/V in every layer, also with a sliding window
    ref = model(ids, attention_mask=am, position_ids=pos, past_key_values=ref_cache).logits

    cache = KVSqueezeCache(model, policy)
    model.set_attn_implementation(ATTENTION_NAME)
    out = model(ids, attention_mask=am, position_ids=pos, past_key_values=cache).logits
    # Prefill attention is dense: every real position equals the plain model.
    torch.testing.assert_close(out[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[real], ref[real], atol=ATOL, rtol=0)
    assert cache.get_seq_length() == t

    kept = kept_from_store(cache, b, t)
    for mask in kept.values():
        assert not bool((mask & ~real[:, None, :]).any())  # padding is never stored
        if not policy.compresses:
            assert torch.equal(mask, real[:, None, :].expand_as(mask))
    if policy.compresses:
        assert sum(int(m.sum()) for m in kept.values()) < len(kept) * int(real.sum()) * cache.layers[0].num_kv_heads
    _ORACLE_KEPT.update(kept)

    chunks = [] if question is None else [question]
    next_tokens = ref[:, -1].argmax(-1, keepdim=True)
    chunks += [None] * decode_steps
    for step, chunk in enumerate(chunks):
        tokens = next_tokens if chunk is None else chunk
        am = torch.cat([am, torch.ones_like(tokens)], dim=-1)
        step_pos = positions_from(am)[:, -tokens.shape[1] :]
        if step == 0 and policy.compresses:
            # The oracle is not vacuous: unmasked attention gives other logits.
            model.set_attn_implementation("sdpa")
            unmasked = model(
                tokens, attention_mask=am, position_ids=step_pos, past_key_values=copy.deepcopy(ref_cache)
            ).logits
        model.set_attn_implementation(ORACLE)
        expect = model(tokens, attention_mask=am, position_ids=step_pos, past_key_values=ref_cache).logits
        model.set_attn_implementation(ATTENTION_NAME)
        got = model(tokens, attention_mask=am, position_ids=step_pos, past_key_values=cache).logits
        torch.testing.assert_close(got, expect, atol=ATOL, rtol=0)
        if step == 0 and policy.compresses:
            assert (unmasked - expect).abs().max() > 10 * ATOL
        next_tokens = expect[:, -1:].argmax(-1)
    assert cache.get_seq_length() == am.shape[1]
    return cache


# --------------------------------------------------------------------------- 1. full == plain
@pytest.mark.parametrize("arch", ARCHS)
def test_full_policy_matches_plain_generate_single_prompt(arch):
    model = tiny_model(arch)
    ids, am = make_batch([64], seed=1)
    ref = plain_generate(model, ids, am, 24)
    cache = KVSqueezeCache(model, make_policy("full"))
    out = greedy(model, ids, am, cache, 24)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is never fed back


@pytest.mark.parametrize("arch", ARCHS)
def test_full_policy_matches_plain_generate_left_padded_batch(arch):
    model = tiny_model(arch)
    ids, am = make_batch(LENGTHS, seed=2)
    ref = plain_generate(model, ids, am, 24)
    cache = KVSqueezeCache(model, make_policy("full"))
    out = greedy(model, ids, am, cache, 24)
    assert torch.equal(out, ref)
    # Every real token of every head is stored, padding never.
    n_real = int(am.sum()) + len(LENGTHS) * (24 - 1)
    layer = cache.layers[0]
    assert cache.stored_tokens() == n_real * layer.num_kv_heads * len(cache.layers)
    assert torch.equal(layer.compressed.real_tokens.cpu(), am.sum(-1) + 24 - 1)


# --------------------------------------------------------------------------- 2. the oracle
# kvzip scores by a context reconstruction that model.generate() does not run (tests/test_score_kvzip.py).
DIRECT = [n for n in policy_names() if not needs_reconstruction(make_policy(n))]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", DIRECT)
def test_compressed_equals_masked_oracle(arch, name):
    model = tiny_model(arch)
    ids, am = make_batch(LENGTHS, seed=3)
    assert_matches_oracle(model, make_policy(name, keep=0.25, window=4), ids, am)


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "pyramidkv", "ada-pyramidkv", "streamingllm", "ada-h2o"])
def test_compressed_equals_masked_oracle_token_budget(name):
    model = tiny_model("qwen2", num_layers=4)
    ids, am = make_batch(LENGTHS, seed=4)
    cache = assert_matches_oracle(model, make_policy(name, tokens=12, window=4), ids, am)
    # Each sequence keeps on average 12 tokens per head per layer (Ada and Pyramid move them around).
    kept = torch.stack([layer.compressed.kept_after_prefill for layer in cache.layers])  # [layers, b, hkv]
    assert torch.equal(kept.sum(dim=(0, 2)), torch.full((len(LENGTHS),), 12 * kept.shape[0] * kept.shape[2]))


def test_compressed_equals_masked_oracle_when_a_prompt_fits_its_budget():
    """tokens=50: the 40-token prompt is left untouched, the longer ones are compressed."""
    model = tiny_model("llama")
    ids, am = make_batch(LENGTHS, seed=17)
    cache = assert_matches_oracle(model, make_policy("ada-snapkv", tokens=50, window=4), ids, am)
    for layer in cache.layers:
        assert layer.compressed.kept_after_prefill[0].tolist() == [LENGTHS[0]] * layer.num_kv_heads
        assert layer.compressed.kept_after_prefill[1:].sum(-1).tolist() == [50 * layer.num_kv_heads] * 2


def sliding_mistral(window: int):
    model = tiny_model("mistral")
    model.config.sliding_window = window
    return model


def test_sliding_window_full_matches_plain_and_compressed_matches_oracle():
    ids, am = make_batch(LENGTHS, seed=18)
    model = sliding_mistral(16)
    ref = plain_generate(model, ids, am, 12)
    assert not torch.equal(ref, plain_generate(tiny_model("mistral"), ids, am, 12))  # the window is in effect
    out = greedy(model, ids, am, KVSqueezeCache(model, make_policy("full")), 12)
    assert torch.equal(out, ref)
    assert_matches_oracle(sliding_mistral(16), make_policy("snapkv", keep=0.25, window=4), ids, am)


def test_oracle_mha_and_max_group_reduce():
    model = tiny_model("llama", num_heads=4, num_kv_heads=4)  # MHA: group of one
    ids, am = make_batch(LENGTHS, seed=5)
    assert_matches_oracle(model, make_policy("ada-snapkv", keep=0.25, window=4), ids, am)
    model = tiny_model("mistral", num_heads=8, num_kv_heads=2)  # GQA group of four
    assert_matches_oracle(model, make_policy("ada-tova", keep=0.25, window=4, group_reduce="max"), ids, am)


# --------------------------------------------------------------------------- 3. memory
def _prefill(model, policy, ids, am) -> KVSqueezeCache:
    cache = KVSqueezeCache(model, policy)
    model.set_attn_implementation(ATTENTION_NAME)  # the explicit, lasting switch (tests below reuse it)
    with torch.no_grad():
        model(ids, attention_mask=am, position_ids=positions_from(am), past_key_values=cache)
    return cache


@pytest.fixture(scope="module")
def memory_runs() -> dict[str, KVSqueezeCache]:
    model = tiny_model("llama", head_dim=64)
    ids, am = make_batch([400], seed=6)
    return {name: _prefill(model, make_policy(name, keep=0.25, window=8), ids, am) for name in DIRECT}


@pytest.mark.parametrize("name", [n for n in DIRECT if n != "full"])
def test_memory_after_prefill(memory_runs, name):
    cache = memory_runs[name]
    t, keep = 400, 0.25
    assert cache.full_nbytes == memory_runs["full"].full_nbytes
    # `full` stores the uncompressed cache (+ small metadata).
    assert memory_runs["full"].full_nbytes <= memory_runs["full"].nbytes <= 1.05 * memory_runs["full"].full_nbytes
    assert cache.nbytes <= 0.30 * cache.full_nbytes
    layer = cache.layers[0]
    per_token = 2 * layer.head_dim * layer.compressed.store.keys.element_size()
    assert cache.nbytes >= cache.stored_tokens() * per_token  # bytes are measured, not assumed
    assert cache.stored_tokens() == round(keep * t) * layer.num_kv_heads * len(cache.layers)
    per_layer = [sum(heads) for heads in cache.kept_tokens_per_head(0)]
    if name.startswith("cross-"):  # one ranking over all layers: uneven layers, the uniform total
        assert sum(per_layer) == round(keep * t) * layer.num_kv_heads * len(per_layer)
    elif "pyramidkv" in name:
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
        assert sum(per_layer) == round(keep * t) * layer.num_kv_heads * len(per_layer)
    else:
        assert per_layer == [round(keep * t) * layer.num_kv_heads] * len(per_layer)
    if name.startswith("ada-"):
        twin = memory_runs[name.removeprefix("ada-")]
        assert abs(cache.nbytes - twin.nbytes) <= 0.05 * twin.nbytes
        for heads in cache.kept_tokens_per_head(0):  # safeguard: alpha x the layer's per-head budget
            assert min(heads) >= int(0.2 * sum(heads) / len(heads))
    elif not name.startswith("cross-"):  # cross-layer heads get per-head shares, like Ada-KV
        for heads in cache.kept_tokens_per_head(0):
            assert len(set(heads)) == 1  # uniform within a layer


def test_ada_heads_really_differ_in_storage(memory_runs):
    """Per-head budgets are real: some layer's heads keep different counts, and the
    store holds exactly those counts (no padding to the longest head)."""
    cache = memory_runs["ada-snapkv"]
    assert any(len(set(heads)) > 1 for heads in cache.kept_tokens_per_head(0))
    for layer in cache.layers:
        assert torch.equal(
            layer.compressed.store.lengths.view_as(layer.compressed.kept_after_prefill),
            layer.compressed.kept_after_prefill,
        )
        assert layer.compressed.store.keys.shape[0] == int(layer.compressed.kept_after_prefill.sum())


# --------------------------------------------------------------------------- 4. continue
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_second_generate_continues_full_cache_like_dynamic_cache(arch):
    model = tiny_model(arch)
    ids, am = make_batch(LENGTHS, seed=7)
    extra = make_batch([5, 5, 5], seed=8)[0]

    def two_rounds(cache, plain: bool):
        def run(i, a):
            return plain_generate(model, i, a, 8, cache) if plain else greedy(model, i, a, cache, 8)

        first = run(ids, am)
        ids2 = torch.cat([first, extra], dim=-1)
        am2 = torch.cat([am, torch.ones(len(LENGTHS), first.shape[1] - ids.shape[1] + 5, dtype=am.dtype)], dim=-1)
        return first, run(ids2, am2)

    ref_first, ref_second = two_rounds(DynamicCache(config=model.config), plain=True)
    cache = KVSqueezeCache(model, make_policy("full"))
    first, second = two_rounds(cache, plain=False)
    assert torch.equal(first, ref_first)
    assert torch.equal(second, ref_second)
    assert cache.get_seq_length() == second.shape[1] - 1


@pytest.mark.parametrize("name", ["ada-snapkv", "pyramidkv", "streamingllm"])
def test_second_generate_continues_compressed_cache(name):
    model = tiny_model("mistral")
    ids, am = make_batch(LENGTHS, seed=9)
    cache = KVSqueezeCache(model, make_policy(name, keep=0.25, window=4))
    first = greedy(model, ids, am, cache, 6)
    kept = [layer.compressed.kept_after_prefill.clone() for layer in cache.layers]
    ids2 = torch.cat([first, make_batch([4, 4, 4], seed=10)[0]], dim=-1)
    am2 = torch.cat([am, torch.ones(3, ids2.shape[1] - ids.shape[1], dtype=am.dtype)], dim=-1)
    second = greedy(model, ids2, am2, cache, 6)
    assert torch.equal(second[:, : ids2.shape[1]], ids2)
    assert second.shape[1] == ids2.shape[1] + 6

    logical = second.shape[1] - 1
    assert cache.get_seq_length() == logical
    layer = cache.layers[0]
    added = logical - ids.shape[1]  # tokens after the prefill: all stored, in every head
    assert torch.equal(layer.compressed.real_tokens.cpu(), am.sum(-1) + added)
    for layer, before in zip(cache.layers, kept, strict=True):
        assert torch.equal(layer.compressed.kept_after_prefill, before)
        assert torch.equal(layer.compressed.store.lengths.view_as(before), before + added)
    dense_real = int(am.sum() + 3 * added) * layer.num_kv_heads * len(cache.layers)
    assert cache.stored_tokens() == sum(int(x.sum()) for x in kept) + 3 * added * layer.num_kv_heads * len(kept)
    assert cache.stored_tokens() < 0.5 * dense_real
    assert cache.nbytes < cache.full_nbytes


# --------------------------------------------------------------------------- 5. question-agnostic
@pytest.mark.parametrize("arch", ARCHS)
def test_question_appended_uncompressed_after_context(arch):
    model = tiny_model(arch)
    ctx, am = make_batch(LENGTHS, seed=11)
    question = make_batch([10, 10, 10], seed=12)[0]
    policy = make_policy("ada-snapkv", keep=0.25, window=4)
    cache = assert_matches_oracle(model, policy, ctx, am, decode_steps=2, question=question)

    t, q = ctx.shape[1], question.shape[1]
    for layer in cache.layers:
        kept = layer.compressed.kept_after_prefill
        kv = layer.compressed.store
        assert torch.equal(kv.lengths.view_as(kept), kept + q + 2)
        for head in range(kv.num_heads):
            pos = kv.head(head)[2].long()
            prefill, later = pos[pos < t], pos[pos >= t]
            assert prefill.numel() == int(kept.flatten()[head])
            assert torch.equal(later, torch.arange(t, t + q + 2))  # question + 2 decoded, all stored
    assert cache.get_seq_length() == t + q + 2


def test_question_chunk_does_not_recompress():
    model = tiny_model("llama")
    ctx, am = make_batch(LENGTHS, seed=13)
    cache = _prefill(model, make_policy("snapkv", keep=0.25, window=4), ctx, am)
    before = [
        (layer.compressed.kept_after_prefill.clone(), layer.compressed.store.num_tokens) for layer in cache.layers
    ]
    question = make_batch([30, 30, 30], seed=14)[0]
    am2 = torch.cat([am, torch.ones_like(question)], dim=-1)
    model(question, attention_mask=am2, position_ids=positions_from(am2)[:, -30:], past_key_values=cache)
    for layer, (kept, n) in zip(cache.layers, before, strict=True):
        assert torch.equal(layer.compressed.kept_after_prefill, kept)
        assert layer.compressed.store.num_tokens == n + 30 * layer.compressed.store.num_heads
    assert cache.get_seq_length() == ctx.shape[1] + 30


# --------------------------------------------------------------------------- 6. bad input
def test_4d_mask_rejected_by_attention_function():
    model = tiny_model("llama")
    q = torch.randn(1, 4, 5, 16)
    kv = torch.randn(1, 2, 5, 16)
    mask4 = torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()
    attn = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="2D padding mask"):
        kvsqueeze_attention(attn, q, kv, kv, mask4)


def test_4d_mask_rejected_through_model():
    model = tiny_model("llama")
    ids = make_batch([20], seed=15)[0]
    cache = KVSqueezeCache(model, make_policy("snapkv", keep=0.25, window=4))
    mask4 = torch.ones(1, 1, 20, 20, dtype=torch.bool).tril()
    with cache, pytest.raises(ValueError, match="2D padding mask"):
        model(ids, attention_mask=mask4, past_key_values=cache)


def test_beam_search_is_refused():
    model = tiny_model("llama")
    ids, am = make_batch([20, 25], seed=16)
    cache = KVSqueezeCache(model, make_policy("snapkv", keep=0.25, window=4))
    with cache, pytest.raises(NotImplementedError, match="beam search"):
        model.generate(
            ids,
            attention_mask=am,
            past_key_values=cache,
            num_beams=2,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )


# --------------------------------------------------------------------------- 7. the attention switch is scoped
def test_the_cache_switches_attention_only_inside_its_block():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    ids, am = make_batch([30], seed=17)
    cache = KVSqueezeCache(model, make_policy("snapkv", keep=0.25, window=4))
    assert model.config._attn_implementation == "sdpa"  # constructing switches nothing
    with pytest.raises(RuntimeError, match="with cache:"):
        model(ids, attention_mask=am, past_key_values=cache)
    cache = KVSqueezeCache(model, make_policy("snapkv", keep=0.25, window=4))
    with cache:
        assert model.config._attn_implementation == ATTENTION_NAME
        out = model.generate(ids, attention_mask=am, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert out.shape[1] == 33
    plain = model.generate(ids, attention_mask=am, max_new_tokens=3, do_sample=False)  # the model is as before
    assert plain.shape[1] == 33


def test_nbytes_follows_a_second_generate():
    model = tiny_model("llama")
    ids = make_batch([200], seed=18)[0]
    cache = KVSqueezeCache(model, make_policy("snapkv", keep=0.25, window=4))
    per_token = 2 * 16 * 4  # keys and values of one head, fp32, head_dim 16
    with cache:
        first = model.generate(ids, past_key_values=cache, max_new_tokens=5, do_sample=False)
        before, stored_before = cache.nbytes, cache.stored_tokens()
        more = torch.cat([first, make_batch([100], seed=19)[0]], dim=-1)
        model.generate(more, past_key_values=cache, max_new_tokens=5, do_sample=False)
    assert cache.stored_tokens() == stored_before + (100 + 5) * 2 * len(cache.layers)  # 2 kv heads
    assert cache.nbytes > before
    assert cache.stored_tokens() * per_token <= cache.nbytes <= 1.2 * cache.stored_tokens() * per_token


def test_full_policy_reports_at_most_one_percent_over_full_after_generate():
    from kvsqueeze.hf.generate import generate
    from kvsqueeze.hf.tiny import byte_tokenizer

    model = tiny_model("llama", head_dim=64)
    result = generate(model, byte_tokenizer(), make_policy("full"), "hello world. " * 60, max_new_tokens=12)
    assert result.kv_bytes_full <= result.kv_bytes_stored <= 1.01 * result.kv_bytes_full
    snap = generate(model, byte_tokenizer(), make_policy("snapkv", keep=0.25), "hello world. " * 60, max_new_tokens=12)
    assert snap.kv_bytes_stored <= 0.3 * snap.kv_bytes_full
