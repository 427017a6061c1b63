"""One recorded prefill, compressed by each policy, gives the cache a fresh run of
that policy builds: same kept entries, same bytes, same logits afterwards."""

import pytest
import torch

from kvsqueeze.hf import KVSqueezeCache, use_kvsqueeze_attention
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.tiny import tiny_model
from kvsqueeze.policy import make_policy

POLICIES = [
    ("full", {}),
    ("snapkv", {"keep": 0.3}),
    ("ada-snapkv", {"keep": 0.3}),
    ("pyramidkv", {"keep": 0.3}),
    ("ada-pyramidkv", {"tokens": 20}),
    ("h2o", {"keep": 0.5}),
    ("streamingllm", {"keep": 0.3}),
]
STEPS = [7, 99, 3, 250]  # teacher-forced decode tokens


def decode(model, cache, first_logits):
    logits = [first_logits]
    for token in STEPS:
        logits.append(model(torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[:, -1])
    return torch.stack(logits)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def setup(request):
    model = tiny_model(request.param)
    prompt = torch.randint(0, 256, (1, 150), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        record = record_prefill(model, prompt)
    return model, prompt, record


@pytest.mark.parametrize("name, budget", POLICIES)
def test_record_matches_a_fresh_run(setup, name, budget):
    model, prompt, record = setup
    policy = make_policy(name, **budget)
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        fresh = KVSqueezeCache(model, policy)
        first = model(prompt, past_key_values=fresh, use_cache=True).logits[:, -1]
        expected = decode(model, fresh, first)
        reused = record.cache(model, policy)
        got = decode(model, reused, record.last_logits)
    assert reused.kept_tokens_per_head(0) == fresh.kept_tokens_per_head(0)
    assert reused.get_seq_length() == fresh.get_seq_length()
    assert reused.nbytes == fresh.nbytes and reused.full_nbytes == fresh.full_nbytes
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if policy.compresses:
        assert reused.nbytes < 0.7 * reused.full_nbytes


def test_scores_are_reused_across_budgets(setup):
    model, prompt, _ = setup
    with torch.inference_mode():
        record = record_prefill(model, prompt)
        small = record.cache(model, make_policy("snapkv", keep=0.2))
        entries = len(record._scores)
        large = record.cache(model, make_policy("snapkv", keep=0.6))
        assert len(record._scores) == entries  # the second budget scored nothing new
        record.cache(model, make_policy("snapkv", keep=0.6, window=8))
        assert len(record._scores) == 2 * entries  # another window is another score
    assert small.stored_tokens() < large.stored_tokens()
