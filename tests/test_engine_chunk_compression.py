"""Per-chunk compression in the engine (`compress_chunks`): each prompt chunk is
compressed as soon as it has run, so a long prompt's stored KV never passes the
budget for the tokens seen so far plus one chunk; with one chunk it keeps what
compress-after-prefill keeps."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.engine.llm import LLM
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.tiny import save_folder, spread_weights, tiny_model
from kvsqueeze.policy import make_policy

KEEP, WINDOW, CHUNK = 0.25, 4, 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_model("llama", max_positions=512, seed=3)
    spread_weights(model)
    path = tmp_path_factory.mktemp("chunks")
    save_folder(model, path)
    return model, path


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "pyramidkv", "streamingllm", "h2o"])
def test_stored_kv_stays_within_the_budget_of_the_tokens_seen(saved, name):
    _, path = saved
    llm = LLM(str(path), policy=name, keep=KEEP, window=WINDOW, dtype="fp32", max_num_batched_tokens=CHUNK,
              compress_chunks=True)  # fmt: skip
    engine = llm.engine
    seq = engine.add_request(_ids(300, 1), GREEDY)
    policy, peak = seq.policy, 0
    while not seq.is_finished:
        engine.step()
        if seq.in_prefill and seq.num_computed:
            seen = torch.tensor([seq.num_computed])
            for layer in range(engine.config.num_layers):
                stored = int(engine.blocks.layer(seq.seq_id, layer).lengths.max())
                budget = int(policy.schedule(policy.budget.per_head(seen), layer, engine.config.num_layers,
                                             policy.window, seen)[0])  # fmt: skip
                assert stored <= budget
                peak = max(peak, stored)
    assert peak <= round(300 * KEEP) * 2  # far below the 300 an uncompressed prompt peaks at
    assert len(seq.output_token_ids) == 5 and engine.blocks.is_whole()


def test_one_chunk_keeps_what_compress_after_prefill_keeps(saved):
    model, path = saved
    prompt = _ids(120, 2)
    cache = KVSqueezeCache(model, make_policy("snapkv", keep=KEEP, window=WINDOW))
    with cache, torch.no_grad():
        out = model.generate(torch.tensor([prompt]), past_key_values=cache, max_new_tokens=5, do_sample=False,
                             pad_token_id=0, eos_token_id=None)  # fmt: skip
    llm = LLM(str(path), policy="snapkv", keep=KEEP, window=WINDOW, dtype="fp32", max_num_batched_tokens=256,
              compress_chunks=True)  # fmt: skip
    got = llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert got == out[0, len(prompt) :].tolist()
