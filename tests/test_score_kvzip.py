"""KVzip: the scorer on hand-made reconstruction attention, and end to end on a tiny
model, where the compressed cache keeps what the reconstruction attended to (checked
against transformers' own eager attention weights)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from kvsqueeze.hf.kvzip import context_start, reconstruct, repeat_inputs
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.prompt import encode_prompt
from kvsqueeze.hf.tiny import byte_tokenizer, tiny_model
from kvsqueeze.policy import ScoreInput, make_policy, parse_policy_name
from kvsqueeze.policy.score import SCORERS, KVzipScorer, ReconstructionChunk

T, D = 12, 16


def pattern(chunks: list[tuple[int, int, list[tuple[int, int, int]]]], r: int = 3) -> ScoreInput:
    """One kv head, two query heads, context keys e_0..e_11 (scaling 1). Each chunk
    (start, end, hits) has r reconstruction tokens whose keys are zero (logit 0); a hit
    (query head, reconstruction query, token) gives that query logit 5 on that token."""
    keys = torch.eye(T, D)[None, None]
    recon = []
    for start, end, hits in chunks:
        queries = torch.zeros(1, 2, r, D)
        for head, query, token in hits:
            queries[0, head, query, token] = 5.0
        recon.append(ReconstructionChunk(start, end, queries, torch.zeros(1, 1, r, D)))
    prompt_queries = torch.zeros(1, 2, T, D)
    valid = torch.ones(1, T, dtype=torch.bool)
    return ScoreInput(prompt_queries, keys, keys.clone(), valid, 1.0, window=2, reconstruction=tuple(recon))


def hit(n_keys: int) -> float:
    """Softmax weight of the one logit-5 key among n_keys keys at logit 0."""
    return math.exp(5) / (math.exp(5) + n_keys - 1)


def test_max_over_reconstruction_queries_and_group():
    # Chunk [4, 12): softmax over 4 sinks + 8 span keys + the reconstruction so far.
    x = pattern([(4, 12, [(0, 0, 6), (1, 2, 9), (0, 2, 6)])])
    scores = KVzipScorer()(x)[0, 0]
    assert torch.equal(scores[:4], torch.ones(4))  # the sinks
    torch.testing.assert_close(scores[6], torch.tensor(hit(12 + 1)))  # query 0 sees 1 reconstruction key: the max
    torch.testing.assert_close(scores[9], torch.tensor(hit(12 + 3)))  # the other head of the group
    # A token nobody aims at: the most it gets is from a query with no hit (head 1, query 0).
    torch.testing.assert_close(scores[5], torch.tensor(1 / 13))
    assert int(scores[4:].argsort(descending=True)[0]) + 4 == 6


def test_chunks_score_their_own_span_on_their_own_softmax():
    x = pattern([(4, 8, [(0, 1, 5)]), (8, 11, [(1, 0, 9)])])
    scores = KVzipScorer()(x)[0, 0]
    torch.testing.assert_close(scores[5], torch.tensor(hit(4 + 4 + 2)))  # 4 sinks + span of 4 + 2 copy keys
    torch.testing.assert_close(scores[9], torch.tensor(hit(4 + 3 + 1)))
    # The first chunk's query aims at 5 only: token 9 is scored by the second chunk alone.
    assert float(scores[9]) > float(scores[10])
    assert float(scores[11]) == 1.0  # no chunk repeats it: kept first
    blocked = KVzipScorer(query_block=1)(x)
    torch.testing.assert_close(blocked, KVzipScorer()(x))


def test_without_reconstruction_kvzip_says_which_path_runs_it():
    x = pattern([(4, 12, [])])
    bare = ScoreInput(x.queries, x.keys, x.values, x.valid, 1.0)
    with pytest.raises(ValueError, match="context reconstruction"):
        KVzipScorer()(bare)
    with pytest.raises(ValueError, match="past the"):
        KVzipScorer()(pattern([(4, T + 1, [])]))
    with pytest.raises(ValueError, match="non-empty span"):
        ReconstructionChunk(5, 5, torch.zeros(1, 2, 1, D), torch.zeros(1, 1, 1, D))


def test_kvzip_names():
    assert SCORERS["kvzip"] is KVzipScorer
    assert parse_policy_name("ada-kvzip").allocator == "ada"
    assert isinstance(make_policy("ada-kvzip", keep=0.5).scorer, KVzipScorer)


def test_repeat_inputs_chunk_the_context_after_the_chat_header():
    tok = byte_tokenizer()
    context_ids, _ = encode_prompt(tok, "abcdefghij" * 3, "q?", chat=True)
    first = context_start(tok, context_ids, chat=True)
    assert tok.decode(context_ids[:first]) == "user: "
    inputs = repeat_inputs(tok, context_ids, chat=True, chunk=12)
    assert [(s, e) for s, e, _ in inputs] == [(first, first + 12), (first + 12, first + 24), (first + 24, first + 30)]
    assert tok.decode(inputs[0][2]).endswith("Repeat the previous context exactly.\nassistant: abcdefghijab")
    assert '"efghijab"' in tok.decode(inputs[1][2])  # the 8 tokens before the second chunk


def eager_reconstruction_scores(model, record, ids: list[int]) -> torch.Tensor:
    """[layers, kv_heads, t]: transformers' eager attention weights of the reconstruction
    over the prompt, max over queries and over each GQA group."""
    cache = DynamicCache(config=model.config)
    for i, layer in enumerate(record.layers):
        cache.update(layer.keys, layer.values, i)
    model.set_attn_implementation("eager")
    try:
        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    t = record.layers[0].keys.shape[2]
    hkv = record.layers[0].keys.shape[1]
    per_layer = [a[0, :, :, :t].amax(dim=1) for a in out.attentions]  # [q_heads, t]
    return torch.stack([s.view(hkv, -1, t).amax(dim=1) for s in per_layer])


def test_the_kvzip_cache_keeps_what_the_reconstruction_attended_to():
    """No chat header and one chunk: KVzip's softmax set (4 sinks, the span, the copy)
    is everything the reconstruction attends to, so its scores are the model's own
    attention weights, and the cache keeps each head's top tokens by them."""
    model, tok = tiny_model("llama", num_layers=2), byte_tokenizer()
    context = "The passphrase is BLUE-HARBOR-7. " + "Grass is green and the sky is blue. " * 3
    context_ids, _ = encode_prompt(tok, context, None, chat=False)
    with torch.inference_mode():
        record = record_prefill(model, torch.tensor([context_ids]))
        rebuilt = reconstruct(model, tok, record, context_ids, chat=False)
        [(start, end, ids)] = repeat_inputs(tok, context_ids, chat=False)
        assert (start, end) == (context_start(tok, context_ids, chat=False), len(context_ids)) and start <= 4
        expected = eager_reconstruction_scores(model, record, ids)
        policy = make_policy("kvzip", keep=0.3, window=4)
        cache = rebuilt.cache(model, policy)
    t = len(context_ids)
    for layer_idx, layer in enumerate(cache.layers):
        x = rebuilt.layers[layer_idx]
        scores = KVzipScorer()(x)[0]
        torch.testing.assert_close(scores[:, 4:], expected[layer_idx][:, 4:], atol=1e-5, rtol=1e-4)
        store = layer.compressed.store
        budget = int(store.lengths[0])
        for head in range(x.keys.shape[1]):
            _, _, positions = store.head(head)
            kept = set(positions.tolist())
            assert len(kept) == budget < t
            protected = set(range(4)) | set(range(t - 4, t))
            chosen = kept - protected
            # Every chosen token outscores every dropped one in the model's own attention.
            dropped = set(range(t)) - kept
            assert min(expected[layer_idx, head, sorted(chosen)]) >= max(expected[layer_idx, head, sorted(dropped)])
    with pytest.raises(ValueError, match="context reconstruction"):
        record.cache(model, policy)  # the plain record has no reconstruction
