"""The engine's paged compressed cache against the HF path's compressed layer, on
random tensors: chunked prefill + compression at the prompt's end + batched decode
give the same attention outputs as one dense prefill + steps; and the pool is whole
after every sequence leaves."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.cache import CompressedLayer
from kvsqueeze.engine.block_manager import BlockManager
from kvsqueeze.engine.kv_cache import PagedCompressedCache
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.engine.scheduler import ScheduledChunk
from kvsqueeze.engine.sequence import Sequence
from kvsqueeze.policy import make_policy

HQ, HKV, D, LAYERS = 6, 2, 16, 2
SCALE = D**-0.5


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, HQ, D, generator=g), torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)


def _reference(policy, layer_idx, prompt, steps, sliding_window):
    """The HF path's layer: dense prefill of the whole prompt, then one token at a time."""
    layer = CompressedLayer(policy, layer_idx, LAYERS)
    q, k, v = prompt
    outs = [
        layer.forward(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None, SCALE, sliding_window
        )[0].transpose(0, 1)
    ]
    for sq, sk, sv in steps:
        outs.append(
            layer.forward(
                sq.transpose(0, 1)[None],
                sk.transpose(0, 1)[None],
                sv.transpose(0, 1)[None],
                None,
                SCALE,
                sliding_window,
            )[0].transpose(0, 1)
        )
    return torch.cat(outs), layer


@pytest.mark.parametrize("name", ["full", "ada-snapkv", "pyramidkv", "h2o", "streamingllm"])
@pytest.mark.parametrize("chunk", [64, 23])
@pytest.mark.parametrize("sliding_window", [None, 20])
def test_chunked_paged_engine_equals_the_hf_layer(name, chunk, sliding_window):
    policy = make_policy(name, keep=0.3, window=4)
    lengths, new = [50, 37], 4
    blocks = BlockManager(LAYERS, HKV, D, torch.float32, "cpu", kv_memory=1 << 22)
    cache = PagedCompressedCache(blocks, HQ, SCALE, [sliding_window] * LAYERS)
    seqs = [Sequence(list(range(n)), SamplingParams(max_tokens=new), policy) for n in lengths]
    prompts = [_tokens(n, seed=i) for i, n in enumerate(lengths)]
    steps = [[_tokens(1, seed=100 + 10 * i + j) for j in range(new)] for i in range(len(seqs))]
    expected = {}
    for layer_idx in range(LAYERS):
        for i in range(len(seqs)):
            expected[(i, layer_idx)] = _reference(policy, layer_idx, prompts[i], steps[i], sliding_window)

    got: dict[tuple[int, int], list[torch.Tensor]] = {key: [] for key in expected}
    # Prefill both prompts in chunks, both in the same steps, then decode both together.
    while any(s.num_computed < s.num_prompt_tokens for s in seqs):
        chunks = [
            ScheduledChunk(s, min(chunk, s.num_prompt_tokens - s.num_computed))
            for s in seqs
            if s.num_computed < s.num_prompt_tokens
        ]
        _run(cache, chunks, lambda i, c: tuple(t[c.start : c.end] for t in prompts[i]), seqs, got)
    for j in range(new):
        chunks = [ScheduledChunk(s, 1) for s in seqs]
        for s in seqs:
            s.output_token_ids.append(0)  # the token the step feeds
        _run(cache, chunks, lambda i, c, j=j: steps[i][j], seqs, got)
    for (i, layer_idx), (want, layer) in expected.items():
        torch.testing.assert_close(torch.cat(got[(i, layer_idx)]), want, atol=1e-5, rtol=1e-5)
        stored = blocks.layer(seqs[i].seq_id, layer_idx)
        assert stored.lengths.tolist() == layer.physical_tokens()[0].tolist()  # same number kept per head
        for h in range(HKV):  # and the very same positions
            assert sorted(stored.head(h)[2].tolist()) == sorted(layer.store.head(h)[2].tolist())
    for s in seqs:
        blocks.free(s.seq_id)
    assert blocks.is_whole()


def _run(cache, chunks, tokens_of, seqs, got):
    index = {s.seq_id: i for i, s in enumerate(seqs)}
    parts = [tokens_of(index[c.seq.seq_id], c) for c in chunks]
    q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
    cache.begin_step(chunks)
    for layer_idx in range(LAYERS):
        out = cache.attend(layer_idx, q, k, v)
        offset = 0
        for c in chunks:
            got[(index[c.seq.seq_id], layer_idx)].append(out[offset : offset + c.num_tokens])
            offset += c.num_tokens
    for c in chunks:
        c.seq.num_computed += c.num_tokens
