"""Cross-layer allocation (KV-Compress) in the engine: no layer evicts before the last
has run the prompt, then one ranking over all layers and heads leaves each store what
the HF path keeps. Token equality with the HF path is in test_engine_llm.py."""

from __future__ import annotations

import torch

from kvsqueeze.engine.llm import LLM
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.tiny import save_folder, spread_weights, tiny_model
from kvsqueeze.policy import make_policy

KEEP, WINDOW = 0.3, 4


def test_each_layer_keeps_what_the_hf_path_keeps(tmp_path):
    model = tiny_model("llama", max_positions=512, seed=3)
    spread_weights(model)
    save_folder(model, tmp_path)
    prompt = torch.randint(3, 259, (90,), generator=torch.Generator().manual_seed(1)).tolist()
    policy = make_policy("cross-snapkv", keep=KEEP, window=WINDOW)
    cache = KVSqueezeCache(model, policy)
    with cache, torch.no_grad():
        model(torch.tensor([prompt]), past_key_values=cache)
    want = cache.kept_tokens_per_head()

    llm = LLM(str(tmp_path), policy="cross-snapkv", keep=KEEP, window=WINDOW, dtype="fp32", max_num_batched_tokens=32)
    engine = llm.engine
    seq = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    cross = engine.cache.cross_layer
    while seq.num_computed < len(prompt):
        engine.step()
        # Mid-prompt nothing is cut: every head of every layer holds all it has run.
        if seq.num_computed < len(prompt):
            lengths = [engine.blocks.layer(seq.seq_id, i).lengths.tolist() for i in range(len(want))]
            assert all(n == seq.num_computed for heads in lengths for n in heads)
    got = [engine.blocks.layer(seq.seq_id, i).lengths.tolist() for i in range(len(want))]
    assert got == want
    assert len({tuple(heads) for heads in got}) > 1  # layers differ: the ranking spans them
    assert len(cross) == 0
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.is_whole()


def test_a_sequence_freed_mid_prompt_leaves_nothing_waiting(tmp_path):
    model = tiny_model("llama", max_positions=512, seed=3)
    save_folder(model, tmp_path)
    llm = LLM(str(tmp_path), policy="cross-snapkv", keep=KEEP, window=WINDOW, dtype="fp32", max_num_batched_tokens=16)
    engine = llm.engine
    seq = engine.add_request(list(range(3, 60)), SamplingParams(max_tokens=2))
    engine.step()
    engine.abort(seq.seq_id)
    assert len(engine.cache.cross_layer) == 0
    assert engine.blocks.is_whole()
