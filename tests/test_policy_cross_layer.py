"""Cross-layer allocation (KV-Compress): one ranking over all layers and heads of a
sequence keeps the uniform total, every head its safeguard and every protected token;
through KVSqueezeCache, generate() and a recorded prefill it stores what uniform stores."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.hf import KVSqueezeCache, use_kvsqueeze_attention
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.tiny import tiny_model
from kvsqueeze.policy import PolicyName, ScoreInput, make_policy, parse_policy_name, policy_names
from kvsqueeze.policy.allocate import CrossLayerAllocator

LAYERS, HEADS, WINDOW, T = 4, 2, 8, 96
N_VALID = [96, 80]  # a left-padded batch


def make_input(seed: int, n_valid: list[int] = N_VALID, t: int = T) -> ScoreInput:
    gen = torch.Generator().manual_seed(seed)
    b, d = len(n_valid), 16
    queries = torch.randn(b, 3 * HEADS, t, d, generator=gen)
    keys, values = torch.randn(b, HEADS, t, d, generator=gen), torch.randn(b, HEADS, t, d, generator=gen)
    valid = torch.arange(t)[None, :] >= (t - torch.tensor(n_valid))[:, None]
    return ScoreInput(queries, keys, values, valid, scaling=d**-0.5, window=WINDOW)


@pytest.fixture(scope="module")
def prefills() -> dict[int, ScoreInput]:
    return {i: make_input(seed=i) for i in range(LAYERS)}


@pytest.mark.parametrize("name", ["cross-snapkv", "cross-h2o", "cross-tova", "cross-streamingllm"])
@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5])
def test_total_safeguard_and_protected_tokens(prefills, name, keep):
    policy = make_policy(name, keep=keep, window=WINDOW, alpha=0.2)
    masks = policy.keep_masks(prefills, LAYERS)
    per_head = torch.stack([masks[i].sum(dim=-1) for i in range(LAYERS)])  # [L, b, h]
    budget = torch.tensor([round(n * keep) for n in N_VALID])
    assert torch.equal(per_head.sum(dim=(0, 2)), LAYERS * HEADS * budget), "total = the uniform total"
    sinks = 4 if name.endswith("streamingllm") else 0
    for i, n in enumerate(N_VALID):
        window = min(WINDOW, int(budget[i]) // 2)
        first = min(int(budget[i]) - window, sinks)
        floor = window + first + int((int(budget[i]) - window - first) * 0.2)
        assert bool((per_head[:, i] >= floor).all()), "every head keeps its safeguard"
        for layer in range(LAYERS):
            kept = masks[layer][i]
            assert bool(kept[:, T - window :].all()), "the observation window is kept"
            assert bool(kept[:, T - n : T - n + first].all()), "the sinks are kept"
            assert not bool(kept[:, : T - n].any()), "padding is never kept"
    assert not bool((per_head == per_head[0, 0, 0]).all()), "heads and layers differ"


def test_a_layer_whose_scores_are_all_higher_keeps_more(prefills):
    policy = make_policy("cross-snapkv", keep=0.25, window=WINDOW)
    scores = {i: policy.scorer(x) for i, x in prefills.items()}
    scores[2] = scores[2] + 1.0  # above every other layer's (attention mass is at most 1)
    masks = policy.keep_masks(prefills, LAYERS, scores)
    totals = torch.stack([masks[i].sum(dim=(1, 2)) for i in range(LAYERS)])  # [L, b]
    uniform = HEADS * torch.tensor([round(n * 0.25) for n in N_VALID])
    assert bool((totals[2] > uniform).all())
    assert bool((totals[[0, 1, 3]] < uniform).all())
    # Everything layer 2 won beyond its floor came from the others' contested slots only.
    assert torch.equal(totals.sum(dim=0), LAYERS * uniform)


def test_allocator_on_raw_scores_prefers_the_best_tokens_anywhere():
    """A hand-made case: no protection, alpha 0, kernel 1: counts are exactly how many of
    each head's tokens rank among the sequence's global top-(L x h x B)."""
    scores = torch.zeros(2, 1, 2, 10)
    scores[1, 0, 0, :7] = 1.0  # layer 1, head 0 holds the 7 best tokens of the sequence
    scores[0, 0, 1, :1] = 0.5  # then layer 0, head 1's one token
    counts = CrossLayerAllocator(alpha=0.0, pool_kernel=1)(scores, torch.tensor([[2], [2]]))
    assert counts[:, 0].tolist() == [[0, 1], [7, 0]]


def test_budget_larger_than_the_candidates_keeps_them_all():
    scores = torch.full((2, 1, 2, 6), float("-inf"))
    scores[..., 3:] = torch.rand(2, 1, 2, 3)  # 3 visible tokens per head
    counts = CrossLayerAllocator(pool_kernel=1)(scores, torch.tensor([[3], [3]]))
    assert counts.flatten().tolist() == [3, 3, 3, 3]


def test_short_prompts_are_kept_whole(prefills):
    policy = make_policy("cross-snapkv", tokens=200, window=WINDOW)
    for i, mask in policy.keep_masks(prefills, LAYERS).items():
        assert torch.equal(mask, prefills[i].valid[:, None, :].expand_as(mask))


def test_bad_input_is_refused(prefills):
    policy = make_policy("cross-snapkv", keep=0.25, window=WINDOW)
    with pytest.raises(ValueError, match="allocates across layers"):
        policy.keep_mask(prefills[0], 0, LAYERS)
    with pytest.raises(ValueError, match="same tokens"):
        policy.keep_masks({0: prefills[0], 1: make_input(1, n_valid=[60, 50], t=60)}, 2)
    with pytest.raises(ValueError, match=r"scores \[layers, batch, heads, tokens\]"):
        CrossLayerAllocator()(torch.rand(2, 10), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="alpha"):
        CrossLayerAllocator(alpha=1.5)
    with pytest.raises(ValueError, match="kernel"):
        CrossLayerAllocator(pool_kernel=4)


def test_name_grammar():
    assert parse_policy_name("cross-snapkv") == PolicyName("snapkv", "cross", "flat")
    assert "cross-h2o" in policy_names()
    for bad in ("cross-pyramidkv", "cross-ada-snapkv", "ada-cross-snapkv", "cross-"):
        with pytest.raises(ValueError, match="unknown policy"):
            parse_policy_name(bad)
    policy = make_policy("cross-snapkv", alpha=0.3, ada_pool_kernel=1)
    assert policy.across_layers and policy.allocator == CrossLayerAllocator(alpha=0.3, pool_kernel=1)
    assert not make_policy("ada-snapkv").across_layers


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=LAYERS)


def prompt(n: int = 120) -> torch.Tensor:
    return torch.randint(3, 259, (1, n), generator=torch.Generator().manual_seed(5))


def greedy(model, policy, ids: torch.Tensor) -> tuple[torch.Tensor, KVSqueezeCache]:
    cache = KVSqueezeCache(model, policy)
    with cache, torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    return out, cache


def test_generate_stores_the_uniform_total(model):
    ids = prompt()
    _, uniform = greedy(model, make_policy("snapkv", keep=0.25, window=WINDOW), ids)
    out, cross = greedy(model, make_policy("cross-snapkv", keep=0.25, window=WINDOW), ids)
    assert out.shape[1] == ids.shape[1] + 6
    kept = torch.tensor(cross.kept_tokens_per_head())  # [layers, kv_heads]
    assert int(kept.sum()) == LAYERS * kept.shape[1] * 30 and len(set(kept.flatten().tolist())) > 1
    assert cross.stored_tokens() == uniform.stored_tokens()
    assert abs(cross.nbytes - uniform.nbytes) <= 0.02 * uniform.nbytes
    assert cross.nbytes < 0.5 * cross.full_nbytes  # 30 + 6 of 126 tokens per head, plus room reserved


def test_keep_one_equals_plain_generation(model):
    ids = prompt()
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out, _ = greedy(model, make_policy("cross-snapkv", keep=1.0), ids)
    assert torch.equal(out, plain)


def test_recorded_prefill_replays_a_fresh_run(model):
    ids = prompt()
    policy = make_policy("cross-snapkv", keep=0.25, window=WINDOW)
    with torch.inference_mode():
        record = record_prefill(model, ids)
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        fresh = KVSqueezeCache(model, policy)
        model(ids, past_key_values=fresh, use_cache=True)
        reused = record.cache(model, policy)
        steps = torch.tensor([[7]])
        expected = model(steps, past_key_values=fresh, use_cache=True).logits
        got = model(steps, past_key_values=reused, use_cache=True).logits
    assert reused.kept_tokens_per_head() == fresh.kept_tokens_per_head()
    assert reused.nbytes == fresh.nbytes
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
