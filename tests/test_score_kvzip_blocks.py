"""KVzip's blocked scoring (query blocks, masks on the copy keys only) equals the plain
definition computed over a whole chunk at once, with GQA, padding and two chunks, and
every query block gives the same scores."""

from __future__ import annotations

import pytest
import torch

from kvsqueeze.policy import ScoreInput
from kvsqueeze.policy.score import KVzipScorer, ReconstructionChunk

HKV, G, D, T, SINKS = 2, 3, 8, 40, 4
CHUNKS = [(6, 25), (25, 38)]  # tokens 0..5 (a header) and 38, 39 (a question) are repeated by no chunk


def reconstructed(pad: int) -> ScoreInput:
    """Two sequences of T tokens, the second left-padded with `pad` slots, and a
    reconstruction of CHUNKS, each with 3 instruction tokens before its copy."""
    gen = torch.Generator().manual_seed(7)
    keys = torch.randn(2, HKV, T, D, generator=gen)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :pad] = False
    chunks = []
    for start, end in CHUNKS:
        r = end - start + 3
        queries = 2 * torch.randn(2, HKV * G, r, D, generator=gen)
        chunks.append(ReconstructionChunk(start, end, queries, torch.randn(2, HKV, r, D, generator=gen)))
    return ScoreInput(torch.zeros(2, HKV * G, T, D), keys, keys.clone(), valid, D**-0.5, reconstruction=tuple(chunks))


def plain_scores(x: ScoreInput) -> torch.Tensor:
    """The definition: per chunk, every copy query's causal softmax over the first real
    sinks, the chunk's span and the copy keys so far; a key's score is the max over the
    queries and its GQA group; tokens no chunk repeats, and the first real sinks, score 1."""
    scores = torch.ones(2, HKV, T)
    for chunk in x.reconstruction:
        span = chunk.end - chunk.start
        sink = min(SINKS, chunk.start)
        keys = torch.cat([x.keys[:, :, :sink], x.keys[:, :, chunk.start : chunk.end], chunk.keys], dim=2)
        r = chunk.keys.shape[2]
        logits = chunk.queries.view(2, HKV, G, r, D) @ keys[:, :, None].transpose(-1, -2) * x.scaling
        context_valid = torch.cat([x.valid[:, :sink], x.valid[:, chunk.start : chunk.end]], dim=1)
        copy_seen = torch.ones(r, r, dtype=torch.bool).tril()  # query i sees copy keys 0..i
        seen = torch.cat([context_valid[:, None, :].expand(2, r, -1), copy_seen.expand(2, -1, -1)], dim=2)
        probs = torch.softmax(logits.masked_fill(~seen[:, None, None], float("-inf")), dim=-1)
        scores[..., chunk.start : chunk.end] = probs[..., sink : sink + span].amax(dim=(2, 3))
    first = x.valid & (x.valid.cumsum(dim=-1) <= SINKS)
    return scores.masked_fill(first[:, None, :], 1.0)


@pytest.mark.parametrize("pad", [0, 9])
def test_blocked_kvzip_equals_the_plain_definition_for_every_block(pad):
    x = reconstructed(pad)
    got = {block: KVzipScorer(sinks=SINKS, query_block=block)(x) for block in (1, 5, 64, 512)}
    torch.testing.assert_close(got[64], plain_scores(x))
    for scores in got.values():  # the block changes a score by fp32 rounding at most (a matmul's path
        torch.testing.assert_close(scores, got[64], rtol=0, atol=1e-6)  # differs by shape on some CPUs)
