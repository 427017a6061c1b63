"""KVzip: Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction", arXiv 2505.23416."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput


@dataclass(frozen=True)
class ReconstructionChunk:
    """One forward of the context reconstruction, for one layer: after the prefill, the
    model is fed a repeat instruction and then, teacher-forced, the context tokens
    [start, end) again, attending over the whole cached context.

    queries: [batch, q_heads, r, head_dim] and keys: [batch, kv_heads, r, head_dim] of
    the r reconstruction tokens (instruction first), after RoPE, as the layer made them.
    """

    start: int
    end: int
    queries: torch.Tensor
    keys: torch.Tensor

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"a reconstruction chunk repeats a non-empty span, got [{self.start}, {self.end})")
        if self.queries.shape[2] != self.keys.shape[2]:
            raise ValueError(
                f"reconstruction queries and keys differ in length: {self.queries.shape[2]} != {self.keys.shape[2]}"
            )


@dataclass(frozen=True)
class KVzipScorer:
    """Query-agnostic scores from context reconstruction: a key's score in a kv head is
    the most attention any reconstruction query of the head's GQA group pays it (max
    over queries, then over the group), so a key matters if repeating the context needs
    it, whatever question comes later.

    As in KVzip, each chunk's attention is a softmax over the first `sinks` tokens, the
    chunk's own context span and the reconstruction tokens so far (causal), not over the
    whole context: the chunk's keys compete with each other and with the copy, and a
    long context cut into chunks scores every chunk on the same scale. The first `sinks`
    real tokens, and tokens no chunk repeats (a chat template's header, a question
    prefilled after the context), score 1, the most an attention probability can be:
    sinks as in KVzip's code, the others because the reconstruction says nothing of
    them, so they are kept first. Queries go through in blocks of `query_block` to bound the
    [queries x keys] logits; small blocks are also faster on CPU (a block's logits stay in
    cache through the masking, the softmax and the max, and fewer copy keys are computed
    only to be hidden), and every block size gives the same scores, to fp32 rounding (MKL
    multiplies a one- or few-query block on another path on some CPUs, e.g. Zen 3).

    The model runs the reconstruction (kvsqueeze.hf.kvzip) and hands it over in
    `ScoreInput.reconstruction`; this scorer only does the arithmetic.
    """

    sinks: int = 4
    query_block: int = 64
    name: str = "kvzip"
    observes_queries: ClassVar[bool] = False  # it observes the reconstruction's queries, not the prompt's
    needs_reconstruction: ClassVar[bool] = True  # paths that run no reconstruction refuse it up front

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.query_block < 1:
            raise ValueError(f"KVzip needs sinks >= 0 and query_block >= 1, got {self.sinks}, {self.query_block}")

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        if not x.reconstruction:
            raise ValueError(
                "kvzip scores keys by a context reconstruction that this path did not run: use `kvsqueeze "
                "generate`/`kvsqueeze eval`, or kvsqueeze.hf.kvzip.reconstruct() on a recorded prefill"
            )
        b, hkv, t, _ = x.keys.shape
        scores = torch.ones(b, hkv, t, device=x.keys.device)
        for chunk in x.reconstruction:
            if chunk.end > t:
                raise ValueError(f"reconstruction chunk [{chunk.start}, {chunk.end}) is past the {t} prompt tokens")
            scores[..., chunk.start : chunk.end] = self._chunk_scores(x, chunk)
        first = x.valid & (x.valid.cumsum(dim=-1) <= self.sinks)  # left padding: the first real tokens
        return scores.masked_fill_(first[:, None, :], 1.0)

    def _chunk_scores(self, x: ScoreInput, chunk: ReconstructionChunk) -> torch.Tensor:
        """[b, kv_heads, end - start]: max attention over the chunk's queries and group."""
        b, hkv, _, d = x.keys.shape
        g = x.group_size
        sink = min(self.sinks, chunk.start)
        span = chunk.end - chunk.start
        r = chunk.keys.shape[2]
        keys = torch.cat([x.keys[:, :, :sink], x.keys[:, :, chunk.start : chunk.end], chunk.keys], dim=2).float()
        context_valid = torch.cat([x.valid[:, :sink], x.valid[:, chunk.start : chunk.end]], dim=1)  # [b, sink+span]
        padding = None if bool(context_valid.all()) else ~context_valid[:, None, None, None, :]
        best = torch.zeros(b, hkv, span, device=x.keys.device)
        ahead = torch.ones(self.query_block, self.query_block, dtype=torch.bool, device=x.keys.device).triu_(1)
        for q0 in range(0, r, self.query_block):
            q1 = min(q0 + self.query_block, r)
            q = chunk.queries[:, :, q0:q1].float().reshape(b, hkv, g * (q1 - q0), d)
            # Copy keys after the block's last query are hidden from all of it (causal): left out.
            seen = keys[:, :, : sink + span + q1]
            logits = (q @ seen.transpose(-1, -2)).mul_(x.scaling).view(b, hkv, g, q1 - q0, -1)
            # Only padding and the block's own copy keys (causal) can be hidden: mask just those.
            if padding is not None:
                logits[..., : sink + span].masked_fill_(padding, float("-inf"))
            logits[..., sink + span + q0 :].masked_fill_(ahead[: q1 - q0, : q1 - q0], float("-inf"))
            probs = torch.softmax(logits, dim=-1)[..., sink : sink + span]
            best = torch.maximum(best, probs.amax(dim=(2, 3)))
        return best
