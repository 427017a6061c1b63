"""Rolling a cache back to a mark (store.truncate / mark / rollback, CompressedLayer and
KVSqueezeCache.rollback): after a rollback, the store, the layer and the cache read,
attend and position the next tokens exactly as a deep copy taken at the mark would;
what cannot be undone exactly (entries before the mark, a quantized group filled since
the mark, a mark from before the prefill) is refused with a clear error, and nothing
changes. eval/answer.py's graded_answer rolls wrong guesses back instead of copying."""

from __future__ import annotations

import copy

import pytest
import torch

from kvsqueeze.eval.answer import graded_answer
from kvsqueeze.hf import KVSqueezeCache, use_kvsqueeze_attention
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.tiny import tiny_model
from kvsqueeze.policy import make_policy
from kvsqueeze.store import FlatKV
from kvsqueeze.store.quantize import KVQuantizer
from kvsqueeze.store.quantized_kv import KVQuantConfig, QuantizedKV
from kvsqueeze.swiftkv import convert

HEADS, D = 4, 16
# kv4 with a small residual window: R + G - 1 = 11 tokens fit before a group is quantized.
QUANT = {"kv_bits": 4, "kv_group": 4, "kv_residual": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def dense(tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(HEADS, tokens, D, generator=g)
    values = torch.randn(HEADS, tokens, D, generator=g)
    keep = torch.rand(HEADS, tokens, generator=g) < 0.6
    return keys, values, keep


def chunk(q: int, start: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(HEADS, q, D, generator=g), torch.randn(HEADS, q, D, generator=g), torch.arange(start, start + q)


def assert_same_store(a, b) -> None:
    assert torch.equal(a.lengths, b.lengths)
    assert a.max_position() == b.max_position()
    for (ka, va, pa), (kb, vb, pb) in zip(a.runs(), b.runs(), strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb) and torch.equal(pa.int(), pb.int())


def flat_store() -> FlatKV:
    return FlatKV.from_dense(*dense(40))


def quantized_store() -> QuantizedKV:
    return QuantizedKV.from_dense(*dense(40), quantizer=KVQuantizer(4, 4), residual_len=8)


# ------------------------------------------------------------------ stores


@pytest.mark.parametrize("make", [flat_store, quantized_store], ids=["flat", "quantized"])
def test_store_rollback_then_append_equals_a_copy(make):
    store = make()
    store.append(*chunk(3, 40, seed=1))  # the lead
    mark, at_mark = store.mark(), copy.deepcopy(store)
    # A wrong guess: long enough to make a FlatKV grow (relayout) but inside a quantized store's room.
    assert store.rollback_room() is None or store.rollback_room() >= 7
    store.append(*chunk(7, 43, seed=2))
    store.rollback(mark)
    assert_same_store(store, at_mark)
    for s in (store, at_mark):  # the next guess, then decode steps past the quantized store's residual window
        s.append(*chunk(5, 43, seed=3))
        for i in range(12):
            s.append(*chunk(1, 48 + i, seed=4 + i))
    assert_same_store(store, at_mark)


def test_flat_rollback_frees_the_slots_and_keeps_the_layout():
    store = flat_store()
    store.reserve(10)
    capacity, free_position = store.capacity.clone(), store.max_position()
    mark = store.mark()
    store.append(*chunk(4, 1000, seed=1))
    assert store.max_position() == 1003
    store.rollback(mark)
    assert store.max_position() == free_position  # the dropped slots hold -1 again
    assert torch.equal(store.capacity, capacity)
    store.append(*chunk(10, 40, seed=2))  # the reservation is whole again: no regrowth
    assert torch.equal(store.capacity, capacity)


def test_flat_rollback_after_a_masked_append():
    store, copy_ = flat_store(), flat_store()
    mark = store.mark()
    valid = torch.tensor([[True, False, True], [False, False, False], [True, True, True], [False, True, False]])
    store.append(*chunk(3, 40, seed=1), valid)
    assert torch.equal(store.lengths - mark.lengths, valid.sum(dim=-1))
    store.rollback(mark)
    assert_same_store(store, copy_)


@pytest.mark.parametrize("make", [flat_store, quantized_store], ids=["flat", "quantized"])
def test_truncate_refuses_bad_lengths(make):
    store = make()
    before = copy.deepcopy(store)
    lengths = store.lengths
    with pytest.raises(ValueError, match="cannot truncate head 2 to .* it holds"):
        store.truncate(lengths + torch.tensor([0, 0, 1, 0]))
    with pytest.raises(ValueError, match="negative"):
        store.truncate(lengths - 100)
    with pytest.raises(ValueError, match="shape"):
        store.truncate(lengths[:2])
    with pytest.raises(ValueError, match="integer"):
        store.truncate(lengths.float())
    later = store.mark()
    store.append(*chunk(2, 40, seed=1))
    store.rollback(later)
    with pytest.raises(ValueError, match="cannot truncate head 0"):  # a mark of more than the store now holds
        store.rollback(type(later)(later.lengths + 1, later.quantized))
    assert_same_store(store, before)


def test_quantized_store_refuses_to_drop_quantized_entries():
    store = quantized_store()  # the whole prefill is quantized, the residual empty
    with pytest.raises(ValueError, match="quantized, and only the full-precision residual"):
        store.truncate(store.lengths - 1)


def test_quantized_store_refuses_a_rollback_once_a_group_was_quantized():
    store = quantized_store()
    store.append(*chunk(3, 40, seed=1))
    mark = store.mark()
    assert store.rollback_room() == 8 + 4 - 1 - 3
    store.append(*chunk(store.rollback_room(), 43, seed=2))  # fills the room, quantizes nothing
    assert torch.equal(store.codes.lengths, mark.quantized)
    store.append(*chunk(1, 51, seed=3))  # one more: the residual reaches R + G and a group is quantized
    before = copy.deepcopy(store)
    with pytest.raises(ValueError, match="entries appended since were quantized"):
        store.rollback(mark)
    assert_same_store(store, before)  # refused before anything changed
    with pytest.raises(ValueError, match="not a quantized store's"):
        quantized_store().rollback(flat_store().mark())


# ------------------------------------------------------------------ caches


def feed(model, cache: KVSqueezeCache, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits


def prompt_ids(n: int = 90) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(7))


LEAD, WRONG, RIGHT = [17, 42, 99], [5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]


def check_rollback_equals_copy(model, cache: KVSqueezeCache) -> None:
    """Feed a lead, mark, feed a wrong guess, roll back; then the cache gives exactly
    the logits, lengths and stores of a copy taken at the mark, for a guess and a few
    greedy steps."""
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        feed(model, cache, prompt_ids()[0].tolist())
        feed(model, cache, LEAD)
        mark = cache.mark()
        at_mark = copy.deepcopy(cache, {id(cache.model): cache.model})
        feed(model, cache, WRONG)
        assert cache.get_seq_length() == at_mark.get_seq_length() + len(WRONG)
        cache.rollback(mark)
        assert cache.get_seq_length() == at_mark.get_seq_length()
        assert cache.stored_tokens() == at_mark.stored_tokens()
        logits = []
        for c in (cache, at_mark):
            logits.append([feed(model, c, RIGHT)])
            for _ in range(3):
                logits[-1].append(feed(model, c, [int(logits[-1][-1][0, -1].argmax())]))
        for a, b in zip(*logits, strict=True):
            assert torch.equal(a, b)
        assert cache.get_seq_length() == at_mark.get_seq_length()
        for a, b in zip(cache.layers, at_mark.layers, strict=True):
            assert a.compressed.seen == b.compressed.seen
            assert (a.compressed.store is None) == (b.compressed.store is None)
            if a.compressed.store is not None:
                assert torch.equal(a.compressed.real_tokens, b.compressed.real_tokens)
                assert_same_store(a.compressed.store, b.compressed.store)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=3, num_heads=HEADS, num_kv_heads=2, head_dim=D)


@pytest.mark.parametrize("policy", ["full", "snapkv", "ada-snapkv", "cross-snapkv"])
@pytest.mark.parametrize("quant", [{}, QUANT], ids=["kv16", "kv4"])
def test_cache_rollback_equals_a_copy(model, policy, quant):
    pol = make_policy(policy) if policy == "full" else make_policy(policy, keep=0.5, window=8)
    check_rollback_equals_copy(model, KVSqueezeCache(model, pol, **quant))


@pytest.mark.parametrize("group", [1, 2])
def test_swiftkv_cache_rollback_equals_a_copy(group):
    swift = convert(tiny_model("llama", num_layers=6), kv_layer=3, across_group=group)
    check_rollback_equals_copy(swift, KVSqueezeCache(swift, make_policy("snapkv", keep=0.5, window=8)))


def test_cache_refuses_marks_it_cannot_return_to(model):
    cache = KVSqueezeCache(model, make_policy("snapkv", keep=0.5, window=8), **QUANT)
    before_prefill = cache.mark()
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        feed(model, cache, prompt_ids()[0].tolist())
        with pytest.raises(ValueError, match="cannot roll back to a mark of 0"):
            cache.rollback(before_prefill)
        mark = cache.mark()
        feed(model, cache, LEAD)
        later = cache.mark()
        cache.rollback(mark)
        with pytest.raises(ValueError, match="cannot roll back to a mark of"):  # past what it holds now
            cache.rollback(later)
        with pytest.raises(ValueError, match="a mark of 2 layers"):
            cache.rollback(mark[:2])
        assert cache.rollback_room() == 8 + 4 - 1
        feed(model, cache, list(range(3, 3 + cache.rollback_room() + 1)))  # one token too many: a group is quantized
        seen, stored = cache.get_seq_length(), cache.stored_tokens()
        with pytest.raises(ValueError, match="entries appended since were quantized"):
            cache.rollback(mark)
        assert (cache.get_seq_length(), cache.stored_tokens()) == (seen, stored)  # all or nothing


# ------------------------------------------------------------------ graded_answer


@pytest.mark.parametrize("quant", [None, KVQuantConfig(4, 4, 8), KVQuantConfig(4, 4, 2)], ids=["kv16", "kv4", "kv4-r2"])
def test_graded_answer_rolls_back_as_the_copies_did(model, quant, monkeypatch):
    """The rollback path gives bit for bit what copying the cache after the lead gives
    (forced by a cache that claims no room); with kv4-r2 the guesses overflow the
    residual window, and graded_answer copies by itself."""
    record = record_prefill(model, prompt_ids())
    policy = make_policy("snapkv", keep=0.5, window=8)
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        start = feed(model, record.cache(model, policy, quant), LEAD)[:, -1].float()
        first = int(start[0].argmax())
        # Wrong target and drafts, then one that starts right: several rollbacks before greedy decoding.
        target, drafts = [first + 1, 3, 4, 5], [[first, 7, 8, 9, 10, 11], [first + 2], [first]]
        args = (record.last_logits, LEAD, target, drafts, 8, {0}, lambda t: False)
        rolled = graded_answer(model, record.cache(model, policy, quant), *args)
        monkeypatch.setattr(KVSqueezeCache, "rollback_room", lambda self: 0)
        copied = graded_answer(model, record.cache(model, policy, quant), *args)
    assert rolled == copied
    assert len(rolled[0]) == 8
