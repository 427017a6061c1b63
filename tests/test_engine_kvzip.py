"""KVzip (arXiv 2505.23416) in the engine: after a prompt (or a shared prefix) is
prefilled in chunks, its reconstruction rows run one a step over the uncompressed
pages, writing nothing to them, and each head then keeps exactly the tokens the HF
path keeps (hf/kvzip.py with the same rows); a row counts against the step's token
budget; aborting or preempting a sequence mid-reconstruction leaves nothing behind.
Greedy-token equality on staggered arrivals is in test_engine_llm.py."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.engine.kvzip import context_rows
from kvsqueeze.engine.llm import LLM
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.engine.tokenizer import Tokenizer
from kvsqueeze.hf.cache import use_kvsqueeze_attention
from kvsqueeze.hf.decode import greedy
from kvsqueeze.hf.kvzip import reconstruct, repeat_inputs
from kvsqueeze.hf.prefill import record_prefill
from kvsqueeze.hf.tiny import byte_tokenizer, save_folder, spread_weights, tiny_model
from kvsqueeze.policy import make_policy
from kvsqueeze.store.quantized_kv import KVQuantConfig

KEEP, WINDOW, BUDGET, NEW = 0.3, 4, 32, 5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = spread_weights(tiny_model("llama", max_positions=512, seed=3))
    path = tmp_path_factory.mktemp("llama")
    save_folder(model, path)
    return model, path


def _prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_record(model, context: list[int]):
    """The HF path's prefill of `context`, with its reconstruction in rows of BUDGET tokens."""
    with torch.inference_mode():
        return reconstruct(
            model, byte_tokenizer(), record_prefill(model, torch.tensor([context])), context, False, BUDGET
        )


def _kept(stores) -> list[list[list[int]]]:
    """Per layer and head: the positions a store keeps, sorted."""
    return [[sorted(kv.head(h)[2].tolist()) for h in range(kv.num_heads)] for kv in stores]


def _policy(name: str):
    return make_policy(name, keep=KEEP, window=WINDOW)


def _greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def _llm(path, name: str, **kwargs) -> LLM:
    return LLM(str(path), policy=name, keep=KEEP, window=WINDOW, dtype="fp32", max_num_batched_tokens=BUDGET, **kwargs)


def test_the_engine_builds_the_hf_paths_rows(saved):
    _, path = saved
    prompt = _prompt(90)
    assert context_rows(Tokenizer(path), prompt, BUDGET) == repeat_inputs(byte_tokenizer(), prompt, False, BUDGET)


class _BosTokenizer:
    """A byte tokenizer that puts a BOS (id 1) first, as many real ones do."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * add_special_tokens + [b + 3 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i > 2).decode(errors="replace")


def test_a_bos_is_not_repeated_and_a_bos_alone_is_refused():
    rows = context_rows(_BosTokenizer(), [1, 10, 11, 12], 2)
    assert [(r.start, r.end) for r in rows] == [(1, 3), (3, 4)]
    assert rows[0].ids[-2:] == [10, 11] and 1 not in rows[0].ids
    with pytest.raises(ValueError, match="after the prompt's BOS"):
        context_rows(_BosTokenizer(), [1], 2)


@pytest.mark.parametrize("name", ["kvzip", "ada-kvzip", "cross-kvzip"])
def test_each_head_keeps_what_the_hf_path_keeps(saved, name):
    model, path = saved
    prompt = _prompt(90)  # three prefill chunks, then three reconstruction rows
    with use_kvsqueeze_attention(model):
        want = _kept(layer.compressed.store for layer in _hf_record(model, prompt).cache(model, _policy(name)).layers)
    engine = _llm(path, name).engine
    seq = engine.add_request(prompt, _greedy())
    assert len(seq.repeat_rows) == 3
    while not seq.compressed:
        engine.step()
        stores = [engine.blocks.layer(seq.seq_id, i) for i in range(len(want))]
        if not seq.compressed:  # the rows write nothing: every head holds the prompt so far, whole
            assert _kept(stores) == [[list(range(seq.num_computed))] * 2] * len(want)
    assert _kept(stores) == want
    assert not engine.cache._rebuilt and not engine.cache._prompt_queries and len(engine.cache.cross_layer) == 0
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.is_whole()


def test_a_row_takes_its_tokens_from_the_step_budget(saved):
    _, path = saved
    engine = _llm(path, "kvzip").engine
    steps = []
    schedule = engine.scheduler.schedule

    def recorded():
        chunks = schedule()
        steps.append([(c.repeats, c.num_tokens) for c in chunks if c.repeats or c.num_tokens > 1])
        return chunks

    engine.scheduler.schedule = recorded
    seqs = [engine.add_request(p, _greedy()) for p in (_prompt(40, 2), _prompt(70, 3), _prompt(20, 4))]
    while engine.has_unfinished():
        engine.step()
    rows = [n for step in steps for repeats, n in step if repeats]
    assert len(rows) == sum(len(s.repeat_rows) for s in seqs) and max(rows) > BUDGET
    for step in steps:
        if any(n > BUDGET for _, n in step):  # a row longer than the budget runs alone
            assert len(step) == 1
        else:
            assert sum(n for _, n in step) <= BUDGET
    assert engine.blocks.is_whole()


def test_abort_mid_reconstruction_frees_everything(saved):
    _, path = saved
    engine = _llm(path, "cross-kvzip").engine
    seq = engine.add_request(_prompt(90), _greedy())
    while seq.num_repeated < 2:
        engine.step()
    assert engine.cache._rebuilt and seq.reconstructing
    engine.abort(seq.seq_id)
    assert engine.blocks.is_whole()
    assert not engine.cache._rebuilt and not engine.cache._prompt_queries and len(engine.cache.cross_layer) == 0
    out = engine.add_request(_prompt(30), _greedy())
    while engine.has_unfinished():
        engine.step()
    assert len(out.output_token_ids) == NEW and engine.blocks.is_whole()


def test_preempted_mid_reconstruction_recomputes_to_the_same_tokens(saved):
    model, path = saved
    prompt = _prompt(90)
    record = _hf_record(model, prompt)
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        want = greedy(
            model,
            record.cache(model, _policy("ada-kvzip")),
            record.last_logits,
            NEW,
            set(),
        )
    engine = _llm(path, "ada-kvzip").engine
    seq = engine.add_request(prompt, _greedy())
    while seq.num_repeated < 2:
        engine.step()
    engine.scheduler._preempt(seq)
    assert seq.num_repeated == seq.num_computed == 0 and not engine.cache._rebuilt
    while engine.has_unfinished():
        engine.step()
    assert seq.output_token_ids == want and engine.blocks.is_whole()


def test_a_shared_prefix_is_reconstructed_and_compressed_once(saved):
    model, path = saved
    prefix, questions = _prompt(70), [_prompt(6, 7), _prompt(9, 8)]
    policy = _policy("ada-kvzip")
    record = _hf_record(model, prefix)
    want_tokens = []
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        want_kept = _kept(layer.compressed.store for layer in record.cache(model, policy).layers)
        for question in questions:  # question-agnostic: the question meets the compressed prefix
            cache = record.cache(model, policy)
            logits = model(torch.tensor([question]), past_key_values=cache, use_cache=True).logits[:, -1]
            want_tokens.append(greedy(model, cache, logits, NEW, set()))
    llm = _llm(path, "ada-kvzip")
    outs = llm.generate(questions, _greedy(), use_tqdm=False, prefix=prefix)
    assert [o.outputs[0].token_ids for o in outs] == want_tokens
    prefixes = llm.engine.blocks.prefixes
    assert prefixes.hits == 1 and _kept(next(iter(prefixes.entries.values()))) == want_kept
    prefixes.clear()
    assert llm.engine.blocks.is_whole()


def test_kvzip_on_quantized_pages_equals_the_hf_path(saved):
    model, path = saved
    prompt = _prompt(70)
    record = _hf_record(model, prompt)
    quant = KVQuantConfig(4, 8, 8)
    with torch.inference_mode(), use_kvsqueeze_attention(model):
        cache = record.cache(model, _policy("kvzip"), quant)
        want = greedy(model, cache, record.last_logits, 20, set())
    llm = _llm(path, "kvzip", kv_bits=4, kv_group=8, kv_residual=8)
    out = llm.generate([prompt], _greedy(20), use_tqdm=False)
    assert out[0].outputs[0].token_ids == want and llm.engine.blocks.is_whole()


def test_a_sliding_window_model_keeps_what_the_hf_path_keeps(tmp_path):
    """Rows attend as the model does, within Mistral's window, in both paths."""
    model = spread_weights(tiny_model("mistral", max_positions=512, seed=3))
    model.config.sliding_window = 24
    save_folder(model, tmp_path)
    prompt = _prompt(70)
    with use_kvsqueeze_attention(model):
        cache = _hf_record(model, prompt).cache(model, _policy("ada-kvzip"))
        want = _kept(layer.compressed.store for layer in cache.layers)
    engine = _llm(tmp_path, "ada-kvzip").engine
    seq = engine.add_request(prompt, _greedy())
    while not seq.compressed:
        engine.step()
    assert _kept(engine.blocks.layer(seq.seq_id, i) for i in range(len(want))) == want
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.is_whole()
