"""SwiftKV checkpoints in the engine: prompt tokens run only the layers below kv_layer
plus one K/V projection, AcrossKV groups share one block entry, and the engine's greedy
tokens equal the HF path's (KVSqueezeCache) for full and compressing policies."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.engine.llm import LLM
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.tiny import save_folder, spread_weights, tiny_model
from kvsqueeze.policy import make_policy
from kvsqueeze.swiftkv import convert

LAYERS, KV_LAYER, WINDOW, KEEP, NEW = 6, 3, 4, 0.3, 6


@pytest.fixture(scope="module", params=[1, 2])
def saved(request, tmp_path_factory):
    llama = tiny_model("llama", num_layers=LAYERS, max_positions=512, seed=3)
    spread_weights(llama)
    swift = convert(llama, kv_layer=KV_LAYER, across_group=request.param)
    with torch.no_grad():  # SwiftKV weights off their initial values, as after distillation
        for p in swift.model.swiftkv.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(f"swift{request.param}")
    save_folder(swift, path)
    return swift, path, request.param


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(model, ids: list[int], policy) -> list[int]:
    cache = KVSqueezeCache(model, policy)
    with cache, torch.no_grad():
        out = model.generate(torch.tensor([ids]), past_key_values=cache, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0, eos_token_id=None)  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", ["full", "snapkv", "ada-snapkv", "pyramidkv", "streamingllm"])
def test_engine_tokens_equal_the_hf_path(saved, name):
    model, path, _ = saved
    prompts = [_ids(70, 1), _ids(23, 2), _ids(41, 3)]
    expected = [hf_greedy(model, ids, make_policy(name, keep=KEEP, window=WINDOW)) for ids in prompts]
    # Chunks of 32: the 70-token prompt's last chunk (6 tokens) is longer than the window.
    llm = LLM(str(path), policy=name, keep=KEEP, window=WINDOW, dtype="fp32", max_num_batched_tokens=32)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.blocks.is_whole()


def test_an_across_kv_group_is_one_block_entry(saved):
    _, path, group = saved
    llm = LLM(str(path), policy="full", dtype="fp32")
    engine = llm.engine
    entries = KV_LAYER + -(-(LAYERS - KV_LAYER) // group)  # a last, shorter group has its own
    assert engine.blocks.num_layers == entries
    seq = engine.add_request(_ids(40, 4), SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    engine.step()
    assert engine.blocks.stored_tokens(seq.seq_id) == 40 * entries * engine.config.num_kv_heads
    stored, full = engine.stored_and_full_tokens()
    assert stored / full == pytest.approx(entries / LAYERS)


def test_kvzip_is_refused_on_a_swiftkv_model(saved):
    _, path, _ = saved
    with pytest.raises(ValueError, match="SwiftKV"):
        LLM(str(path), policy="kvzip", dtype="fp32")
    llm = LLM(str(path), policy="snapkv", dtype="fp32")
    with pytest.raises(ValueError, match="SwiftKV"):
        llm.engine.add_request(_ids(20, 5), SamplingParams(max_tokens=2), make_policy("ada-kvzip"))
    assert llm.engine.blocks.is_whole()
