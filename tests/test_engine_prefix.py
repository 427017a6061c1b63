"""Shared-prefix reuse in the engine: a prefix many requests share is compressed once,
question-agnostically, and its blocks are shared. The tokens equal the HF path's when
the prefix is compressed alone and the question is appended to the compressed cache;
the prefix's blocks are held once; preemption and bad input keep the pool whole."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.engine.llm import LLM
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.tiny import save_folder, spread_weights, tiny_model
from kvsqueeze.policy import make_policy

NEW = 5
KEEP, WINDOW = 0.3, 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("llama", max_positions=512, seed=3)
    spread_weights(model)
    path = tmp_path_factory.mktemp("prefix")
    save_folder(model, path)
    return model, path


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = _ids(90, 0)
QUESTIONS = [_ids(7, 1), _ids(12, 2), _ids(3, 3)]


def hf_prefix_greedy(model, prefix: list[int], question: list[int], policy, new: int = NEW) -> list[int]:
    """The HF path: compress the prefix alone, then generate on prefix + question."""
    cache = KVSqueezeCache(model, policy)
    ids = prefix + question
    with cache, torch.no_grad():
        model(torch.tensor([prefix]), past_key_values=cache)
        out = model.generate(
            torch.tensor([ids]), past_key_values=cache, max_new_tokens=new, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", ["full", "snapkv", "ada-snapkv", "pyramidkv", "streamingllm", "tova"])
def test_prefix_requests_equal_the_hf_path_and_reuse_the_prefix(saved, name):
    model, path = saved
    expected = [hf_prefix_greedy(model, PREFIX, q, make_policy(name, keep=KEEP, window=WINDOW)) for q in QUESTIONS]
    llm = LLM(str(path), policy=name, keep=KEEP, window=WINDOW, dtype="fp32", max_num_batched_tokens=32)
    outs = llm.generate(QUESTIONS, GREEDY, use_tqdm=False, prefix=PREFIX)
    assert [o.outputs[0].token_ids for o in outs] == expected
    blocks = llm.engine.blocks
    assert blocks.prefixes.hits == len(QUESTIONS) - 1  # computed once, reused by the others
    assert not blocks.kv and len(blocks.prefixes) == 1  # only the cached prefix holds blocks
    blocks.prefixes.clear()
    assert blocks.is_whole()


def test_a_shared_prefix_is_stored_once(saved):
    _, path = saved
    llm = LLM(str(path), policy="snapkv", keep=KEEP, window=WINDOW, dtype="fp32")
    engine = llm.engine
    document = _ids(400, 4)  # 120 tokens per head kept: 8 blocks, the last one partly filled
    engine.add_request(QUESTIONS[0], GREEDY, prefix=document)
    while engine.blocks.prefixes.hits == 0 and not engine.blocks.prefixes:
        engine.step()  # the first request computes and caches the prefix
    cached = engine.blocks.blocks_in_use()
    for q in QUESTIONS * 3:
        engine.add_request(q, GREEDY, prefix=document)
    engine.step()  # every request admitted on forked blocks
    running = len(engine.scheduler.running)
    assert running == 1 + 3 * len(QUESTIONS)
    # Each request adds only copies of the prefix's partly filled last blocks (one per
    # head) and its question's blocks, far less than a private copy of the compressed prefix.
    per_request = (engine.blocks.blocks_in_use() - cached) / (running - 1)
    assert per_request <= 2 * 3 * 2 < 0.25 * cached
    while engine.has_unfinished():
        engine.step()
    engine.blocks.prefixes.clear()
    assert engine.blocks.is_whole()


def test_prefix_reuse_survives_preemption_and_a_small_pool(saved):
    model, path = saved
    policy = make_policy("snapkv", keep=0.5, window=WINDOW)
    expected = [hf_prefix_greedy(model, PREFIX, q, policy, new=30) for q in QUESTIONS * 2]
    # 3 layers x 2 kv heads, 54 blocks: one prompt's uncompressed prefix takes 36; requests
    # decoding 30 tokens outgrow the pool and are preempted, then fork the prefix again.
    kv_memory = 54 * 16 * (2 * 16 * 4 + 4)
    llm = LLM(str(path), policy="snapkv", keep=0.5, window=WINDOW, dtype="fp32", kv_memory=kv_memory, reserve=False)
    outs = llm.generate(QUESTIONS * 2, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                        use_tqdm=False, prefix=PREFIX)  # fmt: skip
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.blocks.prefixes.clear()
    assert llm.engine.blocks.is_whole()


def test_bad_prefixes_are_refused(saved):
    _, path = saved
    llm = LLM(str(path), policy="snapkv", keep=KEEP, window=WINDOW, dtype="fp32")
    engine = llm.engine
    with pytest.raises(ValueError, match="max_kv_tokens cannot be combined with a shared prefix"):
        engine.add_request(QUESTIONS[0], GREEDY, max_kv_tokens=64, prefix=PREFIX)
    with pytest.raises(ValueError, match="empty prefix"):
        engine.add_request(QUESTIONS[0], GREEDY, prefix=[])
    out = llm.generate([QUESTIONS[0]], GREEDY, use_tqdm=False, prefix=PREFIX)
    assert len(out[0].outputs[0].token_ids) == NEW


def test_prefix_keys_compare_by_content_and_hash_once():
    from kvsqueeze.engine.prefix_cache import PrefixKey

    key, same = PrefixKey("snapkv", tuple(range(5000))), PrefixKey("snapkv", tuple(range(5000)))
    assert key == same and hash(key) == hash(same) and {key: 1}[same] == 1
    assert key != PrefixKey("snapkv", tuple(range(4999))) and key != PrefixKey("tova", tuple(range(5000)))
    assert key._hash == hash(("snapkv", tuple(range(5000))))  # computed at construction, not per lookup
