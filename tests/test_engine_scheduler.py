"""Scheduler and BlockManager: chunked prefill within the token budget, admission by
the real footprint, preemption by recompute when the pool is short, no leaks."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.engine.block_manager import BlockManager
from kvsqueeze.engine.footprint import peak_blocks
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.engine.scheduler import Scheduler
from kvsqueeze.engine.sequence import Sequence, SequenceStatus
from kvsqueeze.policy import make_policy

LAYERS, HKV, D, BLOCK = 2, 2, 8, 16
BLOCK_BYTES = BLOCK * (2 * D * 4 + 4)


def _manager(blocks: int) -> BlockManager:
    return BlockManager(LAYERS, HKV, D, torch.float32, "cpu", kv_memory=blocks * BLOCK_BYTES)


def _seq(n: int, max_tokens: int = 4) -> Sequence:
    return Sequence(list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), make_policy("full"))


def _store(bm: BlockManager, chunks) -> None:
    """What a forward does to the pool: every chunk's tokens go into every head of every layer."""
    for c in chunks:
        for layer in range(LAYERS):
            kv = bm.layer(c.seq.seq_id, layer)
            keys = torch.zeros(HKV, c.num_tokens, D)
            positions = torch.arange(c.start, c.end)
            if kv is None:
                bm.join(c.seq.seq_id, layer, keys, keys, positions)
            else:
                kv.append(keys, keys, positions)
        samples = c.samples
        c.seq.num_computed += c.num_tokens
        if samples:
            c.seq.output_token_ids.append(7)


def test_prefill_is_chunked_by_the_token_budget_and_decodes_go_first():
    bm = _manager(1000)
    sched = Scheduler(bm, max_num_batched_tokens=40)
    a, b = _seq(70), _seq(30)
    sched.add(a)
    sched.add(b)
    chunks = sched.schedule()
    assert [(c.seq, c.num_tokens) for c in chunks] == [(a, 40)]
    _store(bm, chunks)
    chunks = sched.schedule()
    assert [(c.seq, c.num_tokens) for c in chunks] == [(a, 30), (b, 10)]
    assert chunks[0].ends_prompt and chunks[0].samples and not chunks[1].samples
    _store(bm, chunks)
    chunks = sched.schedule()
    assert [(c.seq, c.num_tokens) for c in chunks] == [(a, 1), (b, 20)]


def test_blocks_for_counts_every_head_of_every_layer():
    bm = _manager(1000)
    seq = _seq(20)
    assert bm.blocks_for(seq.seq_id, 20) == LAYERS * HKV * 2
    bm.join(seq.seq_id, 0, torch.zeros(HKV, 20, D), torch.zeros(HKV, 20, D), torch.arange(20))
    # layer 0 holds 20 per head (2 blocks): 12 more fit, a 13th takes a block; layer 1 starts from nothing
    assert bm.blocks_for(seq.seq_id, 12) == 0 + HKV * 1
    assert bm.blocks_for(seq.seq_id, 13) == HKV * 1 + HKV * 1
    assert bm.blocks_for(seq.seq_id, 29) == HKV * 2 + HKV * 2


def test_pool_short_preempts_the_newest_and_recomputes_it_without_leaks():
    # Room for two 32-token sequences (2 blocks x 2 heads x 2 layers = 8 each) and little more.
    bm = _manager(18)
    sched = Scheduler(bm, max_num_batched_tokens=64, reserve=False)
    a, b = _seq(32, max_tokens=20), _seq(32, max_tokens=20)
    sched.add(a)
    sched.add(b)
    steps = 0
    while sched.has_unfinished():
        chunks = sched.schedule()
        assert chunks, "a step that schedules nothing would loop forever"
        _store(bm, chunks)
        for s in list(sched.running):
            if len(s.output_token_ids) >= s.params.max_tokens:
                sched.finish(s, "length")
        assert bm.blocks_in_use() <= bm.num_blocks
        steps += 1
        assert steps < 200
    assert sched.num_preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0
    assert a.status is SequenceStatus.FINISHED and b.status is SequenceStatus.FINISHED
    assert len(a.output_token_ids) == len(b.output_token_ids) == 20
    assert bm.is_whole()


def test_finish_returns_blocks_at_once():
    bm = _manager(100)
    sched = Scheduler(bm)
    seq = _seq(40)
    sched.add(seq)
    _store(bm, sched.schedule())
    assert bm.blocks_in_use() == LAYERS * HKV * 3
    sched.finish(seq, "abort")
    assert bm.is_whole() and not sched.has_unfinished()


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="kv_memory"):
        _manager(1)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(_manager(100), max_num_seqs=0)
    with pytest.raises(ValueError, match="empty prompt"):
        Sequence([], SamplingParams(), make_policy("full"))


def test_peak_blocks_is_the_larger_of_the_uncompressed_prompt_and_the_end_of_generation():
    def seq(policy: str, prompt: int, new: int, cap: int | None = None) -> Sequence:
        keep = None if policy == "full" else 0.25
        params = SamplingParams(max_tokens=new)
        return Sequence(list(range(prompt)), params, make_policy(policy, keep=keep, window=8), max_kv_tokens=cap)

    heads = LAYERS * HKV
    assert peak_blocks(seq("full", 100, 30), LAYERS, HKV, BLOCK) == (heads * 9, heads * 9)  # 130 tokens: 9 a head
    # snapkv keeps 32 of 128: the uncompressed prompt (8 blocks a head) is the peak for a short
    # answer; after compression, 32 + 8 tokens (3 blocks) and one of slack
    assert peak_blocks(seq("snapkv", 128, 8), LAYERS, HKV, BLOCK) == (heads * 8, heads * 4)
    # ...and the end of a long one: 32 + 200 tokens, 15 blocks, one of slack
    assert peak_blocks(seq("snapkv", 128, 200), LAYERS, HKV, BLOCK) == (heads * 16, heads * 16)
    # decoding under a cap of 96 tokens a head: 6 blocks and the slack, below the prompt's 8
    assert peak_blocks(seq("snapkv", 128, 200, cap=96), LAYERS, HKV, BLOCK) == (heads * 8, heads * 7)


def test_reserving_admission_waits_instead_of_preempting():
    # The pool of the preemption test above: each sequence peaks at 52 tokens (4 blocks a
    # head, 16 in all), so the second waits for the first to finish instead of being preempted.
    bm = _manager(18)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    a, b = _seq(32, max_tokens=20), _seq(32, max_tokens=20)
    sched.add(a)
    sched.add(b)
    running_together = False
    while sched.has_unfinished():
        chunks = sched.schedule()
        assert chunks
        running_together |= len(sched.running) > 1
        _store(bm, chunks)
        for s in list(sched.running):
            if len(s.output_token_ids) >= s.params.max_tokens:
                sched.finish(s, "length")
    assert sched.num_preemptions == 0 and not running_together
    assert len(a.output_token_ids) == len(b.output_token_ids) == 20 and bm.is_whole()
    # A pool that holds both peaks runs them together.
    bm = _manager(32)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    sched.add(_seq(32, max_tokens=20))
    sched.add(_seq(32, max_tokens=20))
    sched.schedule()
    assert len(sched.running) == 2


def test_a_compressed_sequence_reserves_its_compressed_footprint():
    # snapkv keeps 16 of 64 tokens: 4 blocks a head before compression (16 in all), 3 after
    # (16 + 8 new tokens and a block of slack: 12 in all). 28 blocks hold one uncompressed
    # prompt beside one compressed sequence, not two uncompressed prompts.
    bm = _manager(28)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    policy = make_policy("snapkv", keep=0.25, window=4)
    a, b = (Sequence(list(range(1, 65)), SamplingParams(max_tokens=8), policy) for _ in range(2))
    sched.add(a)
    sched.add(b)
    chunks = sched.schedule()
    assert [c.seq for c in chunks] == [a]
    _store(bm, chunks)
    for layer in range(LAYERS):  # what a's policy does at the end of its prompt: keep 16 tokens a head
        bm.layer(a.seq_id, layer).evict(torch.arange(64).expand(HKV, 64) < 16)
    assert bm.blocks_in_use() == LAYERS * HKV * 1
    assert [c.seq for c in sched.schedule()] == [a, b]
