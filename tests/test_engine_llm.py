"""The engine end to end on tiny random models saved as HF folders: its greedy tokens
equal the HF path's (KVSqueezeCache in model.generate; KVzip's reconstruction for the
kvzip presets) for the full cache and every compressing preset, with requests of
different lengths arriving at different times, prompts longer than one prefill chunk,
and a pool small enough to preempt; the pool is whole when the engine is idle."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.engine.llm import LLM
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.cache import use_kvsqueeze_attention
from kvsqueeze.hf.decode import greedy
from kvsqueeze.hf.kvzip import reconstruct
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.tiny import byte_tokenizer, save_folder, spread_weights, tiny_model
from kvsqueeze.policy import make_policy, policy_names
from kvsqueeze.policy.reconstruction import needs_reconstruction

NEW = 6
KEEP, WINDOW = 0.3, 4


def _folder(tmp_path_factory, arch: str, sliding_window: int | None = None):
    model = tiny_model(arch, max_positions=512, seed=3)
    spread_weights(model)
    if sliding_window is not None:
        model.config.sliding_window = sliding_window
    path = tmp_path_factory.mktemp(arch)
    save_folder(model, path)
    return model, path


_FOLDERS: dict[str, tuple] = {}


def _saved(arch: str, tmp_path_factory):
    """One saved model per architecture for the whole module (Mistral with a sliding window)."""
    if arch not in _FOLDERS:
        _FOLDERS[arch] = _folder(tmp_path_factory, arch, 24 if arch == "mistral" else None)
    return _FOLDERS[arch]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def saved(request, tmp_path_factory):
    return _saved(request.param, tmp_path_factory)


# Every preset on Llama; the other architectures (Qwen2's biases, Mistral's sliding window) on a few.
# No kvzip on Mistral: the HF path's reconstruction cannot crop a sliding-window DynamicCache.
CASES = [("llama", n) for n in policy_names()] + [
    ("qwen2", "full"), ("qwen2", "ada-snapkv"), ("qwen2", "kvzip"), ("mistral", "full"), ("mistral", "snapkv"),
    ("mistral", "ada-pyramidkv"),
]  # fmt: skip


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, ids: list[int], policy, chunk: int = 32) -> list[int]:
    """The HF path's greedy tokens; a KVzip policy reconstructs `ids` as a raw-text context
    in rows of `chunk` tokens, the engine's max_num_batched_tokens in these tests."""
    if needs_reconstruction(policy):
        with torch.inference_mode(), use_kvsqueeze_attention(model):
            record = reconstruct(model, byte_tokenizer(), record_prefill(model, torch.tensor([ids])), ids, False, chunk)
            return greedy(model, record.cache(model, policy), record.last_logits, NEW, set())
    cache = KVSqueezeCache(model, policy)
    with cache, torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), past_key_values=cache, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize(("arch", "name"), CASES)
def test_engine_tokens_equal_the_hf_path(arch, name, tmp_path_factory):
    model, path = _saved(arch, tmp_path_factory)
    prompts = _prompts([70, 23, 41])
    policy = make_policy(name, keep=KEEP, window=WINDOW)
    expected = [hf_greedy(model, ids, policy) for ids in prompts]
    llm = LLM(str(path), policy=name, keep=KEEP, window=WINDOW, dtype="fp32", max_num_batched_tokens=32)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    # Arrivals at different times: one now, one after two steps, one after four.
    seqs = {0: engine.add_request(prompts[0], params)}
    step, done = 0, {}
    while engine.has_unfinished() or len(seqs) < 3:
        if step == 2:
            seqs[1] = engine.add_request(prompts[1], params)
        if step == 4:
            seqs[2] = engine.add_request(prompts[2], params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert [done[seqs[i].seq_id] for i in range(3)] == expected
    assert engine.blocks.is_whole()


@pytest.mark.parametrize("reserve", [False, True])
def test_preemption_recomputes_to_the_same_tokens(tmp_path_factory, reserve):
    model, path = _folder(tmp_path_factory, "llama")
    prompts = _prompts([60, 60, 60, 60], seed=5)
    policy = make_policy("snapkv", keep=0.5, window=WINDOW)
    expected = [hf_greedy(model, ids, policy) for ids in prompts]
    # 3 layers x 2 kv heads: a 60-token prompt takes 24 blocks before compression; 60 blocks hold
    # two sequences at a time, so the others wait or (admitted on their next chunk alone) get preempted.
    kv_memory = 60 * 16 * (2 * 16 * 4 + 4)
    llm = LLM(str(path), policy="snapkv", keep=0.5, window=WINDOW, dtype="fp32", kv_memory=kv_memory, reserve=reserve)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert (llm.engine.scheduler.num_preemptions == 0) == reserve
    assert llm.engine.blocks.is_whole()


def test_sampling_is_reproducible_per_seed_and_stops(saved):
    _, path = saved
    llm = LLM(str(path), policy="ada-snapkv", keep=0.5, window=WINDOW, dtype="fp32")
    prompts = _prompts([30, 50], seed=9)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=123, max_tokens=8, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    together = llm.generate(prompts, [seeded, SamplingParams(temperature=1.0, seed=7, max_tokens=8)], use_tqdm=False)
    assert together[0].outputs[0].token_ids == alone
    stop_id = alone[3]
    stopped = llm.generate(
        [prompts[0]], SamplingParams(**{**seeded.__dict__, "stop_token_ids": [stop_id]}), use_tqdm=False
    )
    out = stopped[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == alone[: alone.index(stop_id) + 1]
    text = llm.generate([prompts[0]], seeded, use_tqdm=False)[0].outputs[0].text
    cut = llm.generate([prompts[0]], SamplingParams(**{**seeded.__dict__, "stop": [text[2:4]]}), use_tqdm=False)
    assert cut[0].outputs[0].text == text[: text.index(text[2:4])] and cut[0].outputs[0].finish_reason == "stop"
    assert llm.engine.blocks.is_whole()


def test_bad_requests_are_refused_and_the_engine_keeps_working(saved):
    _, path = saved
    llm = LLM(str(path), policy="snapkv", keep=0.5, dtype="fp32")
    engine = llm.engine
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        engine.add_request([5] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="unknown policy"):
        engine.policy_for("nope", None, None)
    with pytest.raises(ValueError, match="keep"):
        engine.policy_for(None, 1.5, None)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "streamingllm", "tova"])
def test_decode_time_eviction_keeps_every_head_under_the_cap(tmp_path_factory, name):
    _, path = _saved("llama", tmp_path_factory)
    cap = 40
    llm = LLM(str(path), policy=name, keep=0.5, window=WINDOW, dtype="fp32", max_kv_tokens=cap)
    engine = llm.engine
    seqs = [
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
        for p in _prompts([30, 120])
    ]
    peak = 0
    while engine.has_unfinished():
        engine.step()
        for s in seqs:
            for layer in range(3):
                kv = engine.blocks.layer(s.seq_id, layer)
                if kv is not None and not s.in_prefill:
                    peak = max(peak, int(kv.lengths.max()))
                    assert int(kv.lengths.max()) <= cap
    assert peak > cap - cap // 8  # it did grow to the cap and was cut back
    assert all(len(s.output_token_ids) == 60 for s in seqs)
    assert engine.blocks.is_whole()
    with pytest.raises(ValueError, match="max_kv_tokens"):
        engine.add_request([5, 6], SamplingParams(), engine.policy_for("full", None, None), max_kv_tokens=64)


@pytest.mark.parametrize("name", ["kvzip", "cross-kvzip"])
def test_what_kvzip_cannot_run_with_is_refused_up_front(saved, name):
    _, path = saved
    with pytest.raises(ValueError, match="compress-chunks"):
        LLM(str(path), policy=name, dtype="fp32", compress_chunks=True)
    llm = LLM(str(path), policy="snapkv", dtype="fp32")
    with pytest.raises(ValueError, match="max_kv_tokens"):
        llm.engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), make_policy(name), max_kv_tokens=64)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2 and llm.engine.blocks.is_whole()
