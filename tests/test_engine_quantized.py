"""The engine's KIVI-quantized paged cache (arXiv 2402.02750) on tiny random models:
kv_bits 16 is the plain engine; at 8, 4 and 2 bits the engine's greedy tokens equal
the HF path's with the same quantization (KVSqueezeCache(kv_bits=...)), decoding past
several residual flushes; pages really hold fewer bytes and the same KV memory admits
more sequences; decode-time eviction and preemption work; the pool is whole after."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.engine.llm import LLM
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.hf import KVSqueezeCache
from kvsqueeze.hf.tiny import save_folder, spread_weights, tiny_model
from kvsqueeze.policy import make_policy
from kvsqueeze.store import BlockPool
from kvsqueeze.store.paged_quantized_kv import PagedQuantizedKV
from kvsqueeze.store.quantized_block_pool import QuantizedBlockPool

KEEP, WINDOW, GROUP, RESIDUAL = 0.3, 4, 8, 8
NEW = 30  # past R + G = 16 decoded tokens: groups flush while decoding

_FOLDERS: dict[str, tuple] = {}


def _saved(arch: str, tmp_path_factory, head_dim: int = 16):
    key = f"{arch}-{head_dim}"
    if key not in _FOLDERS:
        model = tiny_model(arch, max_positions=512, seed=3, head_dim=head_dim)
        spread_weights(model)
        if arch == "mistral":
            model.config.sliding_window = 24
        path = tmp_path_factory.mktemp(key)
        save_folder(model, path)
        _FOLDERS[key] = (model, path)
    return _FOLDERS[key]


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, ids: list[int], policy, bits: int, new: int = NEW) -> list[int]:
    cache = KVSqueezeCache(model, policy, kv_bits=bits, kv_group=GROUP, kv_residual=RESIDUAL)
    with cache, torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), past_key_values=cache, max_new_tokens=new, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def _greedy(new: int = NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)


def _llm(path, name: str, bits: int, **kwargs) -> LLM:
    keep = None if name == "full" else KEEP
    return LLM(
        str(path), policy=name, keep=keep, window=WINDOW, dtype="fp32", kv_bits=bits, kv_group=GROUP,
        kv_residual=RESIDUAL, **kwargs,
    )  # fmt: skip


def test_kv_bits_16_is_the_unquantized_engine(tmp_path_factory):
    _, path = _saved("llama", tmp_path_factory)
    prompts = _prompts([70, 23])
    plain = LLM(str(path), policy="snapkv", keep=KEEP, window=WINDOW, dtype="fp32")
    sixteen = _llm(path, "snapkv", 16)
    assert isinstance(sixteen.engine.blocks.pool, BlockPool)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, _greedy(), use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in sixteen.generate(prompts, _greedy(), use_tqdm=False)]
    assert got == expected and sixteen.engine.blocks.is_whole()


CASES = [("llama", name, bits) for name in ("full", "snapkv", "ada-snapkv") for bits in (8, 4, 2)] + [
    ("qwen2", "ada-snapkv", 4), ("mistral", "snapkv", 4), ("mistral", "full", 8),
]  # fmt: skip


@pytest.mark.parametrize(("arch", "name", "bits"), CASES)
def test_engine_tokens_equal_the_hf_path_with_the_same_quantization(arch, name, bits, tmp_path_factory):
    """Requests arrive at different steps, the longest prompt runs as three chunks."""
    model, path = _saved(arch, tmp_path_factory)
    prompts = _prompts([70, 23, 41])
    policy = make_policy(name, keep=KEEP, window=WINDOW)
    expected = [hf_greedy(model, ids, policy, bits) for ids in prompts]
    engine = _llm(path, name, bits, max_num_batched_tokens=32).engine
    assert isinstance(engine.blocks.pool, QuantizedBlockPool)
    seqs = {0: engine.add_request(prompts[0], _greedy())}
    step, done = 0, {}
    while engine.has_unfinished() or len(seqs) < 3:
        if step == 2:
            seqs[1] = engine.add_request(prompts[1], _greedy())
        if step == 4:
            seqs[2] = engine.add_request(prompts[2], _greedy())
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        step += 1
    assert [done[seqs[i].seq_id] for i in range(3)] == expected
    assert engine.blocks.is_whole()


def _stores_after_prefill(path, bits: int, name: str = "full", dtype: str = "bf16") -> list:
    """Every layer's store of one 200-token request, right after its prompt has run."""
    keep = None if name == "full" else 0.25
    llm = LLM(str(path), policy=name, keep=keep, dtype=dtype, kv_bits=bits, kv_group=32, kv_residual=128)
    engine = llm.engine
    seq = engine.add_request(_prompts([200])[0], _greedy(4))
    while seq.in_prefill:
        engine.step()
    return [engine.blocks.layer(seq.seq_id, i) for i in range(engine.blocks.num_layers)], engine


def test_stored_bytes_shrink_with_the_bits_at_head_dim_64(tmp_path_factory):
    _, path = _saved("llama", tmp_path_factory, head_dim=64)
    stored = {}
    for bits in (16, 8, 4, 2):
        stores, engine = _stores_after_prefill(path, bits)
        assert (bits == 16) != all(isinstance(kv, PagedQuantizedKV) for kv in stores)
        stored[bits] = sum(kv.nbytes for kv in stores)
        engine.abort_all()
        assert engine.blocks.is_whole()
    # 200 tokens x 2 heads x 3 layers; bf16 K/V + int32 positions: 260 bytes a token and head.
    # A page is one key group of 32 (codes, value rows with fp16 scale and zero per 32
    # channels, int32 positions, fp16 key scale and zero per channel): 0.58 / 0.32 / 0.20 of
    # bf16 at int8 / int4 / int2, plus each head's short first group.
    assert stored[8] / stored[16] < 0.62
    assert stored[4] / stored[16] < 0.36  # about a quarter, plus scales, zeros and positions
    assert stored[2] / stored[16] < 0.24


def test_page_layout_holds_a_key_group_in_a_quarter_of_the_bytes():
    from kvsqueeze.store.quantize import KVQuantizer

    bf16_token = BlockPool.bytes_per_block(64, torch.bfloat16, 1)  # 260: K, V and a position
    for bits, group, bound in ((8, 256, 0.53), (4, 256, 0.29), (2, 256, 0.17), (4, 32, 0.33)):
        page = QuantizedBlockPool.page_bytes(64, KVQuantizer(bits, group), torch.bfloat16)
        assert page / group / bf16_token < bound, (bits, group, page)
        layout = QuantizedBlockPool.layout(64, KVQuantizer(bits, group), torch.bfloat16)
        assert layout["block_size"] <= group  # a group never needs more pages than the entries it replaces


def test_the_same_kv_memory_admits_more_sequences_at_fewer_bits(tmp_path_factory):
    _, path = _saved("llama", tmp_path_factory, head_dim=64)
    prompts = _prompts([64] * 5, seed=4)
    running = {}
    for bits in (16, 4):
        # 16 bits: 30 blocks of 4160 bytes a sequence (72 fit: 2 at once). 4 bits: 42 pages of 2688
        # bytes while the prompt is in bf16, 30 once it is quantized (111 fit: 3 at once).
        llm = LLM(str(path), policy="full", dtype="bf16", kv_memory=300_000, kv_bits=bits, kv_group=32,
                  kv_residual=16, max_num_batched_tokens=64)  # fmt: skip
        outs = llm.generate(prompts, _greedy(8), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
        assert llm.engine.scheduler.num_preemptions == 0 and llm.engine.blocks.is_whole()
        running[bits] = llm.engine.peak_running
    assert running[4] > running[16]


@pytest.mark.parametrize("name", ["snapkv", "ada-snapkv", "streamingllm"])
def test_decode_time_eviction_on_quantized_pages(tmp_path_factory, name):
    _, path = _saved("llama", tmp_path_factory)
    cap = 40
    engine = _llm(path, name, 4, max_kv_tokens=cap).engine
    seqs = [engine.add_request(p, _greedy(60)) for p in _prompts([30, 120])]
    peak = 0
    while engine.has_unfinished():
        engine.step()
        for s in seqs:
            for layer in range(3):
                kv = engine.blocks.layer(s.seq_id, layer)
                if kv is not None and not s.in_prefill:
                    assert isinstance(kv, PagedQuantizedKV) and kv.quantized
                    peak = max(peak, int(kv.lengths.max()))
                    assert int(kv.lengths.max()) <= cap
                    assert int(kv.q_counts.sum()) > 0  # quantized entries survive eviction
    assert peak > cap - cap // 8
    assert all(len(s.output_token_ids) == 60 for s in seqs)
    assert engine.blocks.is_whole()


def test_preemption_recomputes_to_the_same_tokens(tmp_path_factory):
    model, path = _saved("llama", tmp_path_factory)
    prompts = _prompts([60, 60, 60, 60], seed=5)
    policy = make_policy("snapkv", keep=0.5, window=WINDOW)
    new = 6  # under R + G: no group flushes before a preemption, so recompute is exact
    expected = [hf_greedy(model, ids, policy, 4, new) for ids in prompts]
    probe = _llm(path, "snapkv", 4).engine.blocks
    assert probe.block_size == 2  # 288-byte pages hold 2 fp32 entries (or a key group of 8 at int4)
    # A 60-token prompt takes 180 pages before compression; 215 hold one and a part: admitted
    # on their next 32-token chunk alone, prompts outgrow the pool and the newest is preempted.
    pages = 215
    llm = LLM(str(path), policy="snapkv", keep=0.5, window=WINDOW, dtype="fp32", kv_bits=4, kv_group=GROUP,
              kv_residual=RESIDUAL, kv_memory=pages * probe.block_nbytes, reserve=False,
              max_num_batched_tokens=32)  # fmt: skip
    outs = llm.generate(prompts, _greedy(new), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.is_whole()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kv_bits": 3}, "kv bits must be one of"),
        ({"kv_bits": 4, "kv_group": 0}, "kv group"),
        ({"kv_bits": 4, "kv_residual": -1}, "kv residual"),
        ({"kv_bits": 4, "kv_group": 12}, "channel group"),  # head_dim 16 is not a multiple of 12
        ({"kv_bits": 4, "compress_chunks": True}, "compress-chunks"),
    ],
)
def test_bad_quantization_settings_are_refused(tmp_path_factory, kwargs, needle):
    _, path = _saved("llama", tmp_path_factory)
    with pytest.raises(ValueError, match=needle):
        LLM(str(path), policy="snapkv", dtype="fp32", **kwargs)


def test_shared_prefixes_are_refused_with_quantization(tmp_path_factory):
    _, path = _saved("llama", tmp_path_factory)
    llm = _llm(path, "snapkv", 4)
    with pytest.raises(ValueError, match="prefix"):
        llm.generate([[5, 6, 7]], _greedy(2), use_tqdm=False, prefix=[8, 9, 10])
    out = llm.generate([[5, 6, 7]], _greedy(2), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2 and llm.engine.blocks.is_whole()
