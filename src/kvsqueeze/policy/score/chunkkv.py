"""ChunkKV: Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient
Long-Context LLM Inference", arXiv 2502.00299."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvsqueeze.policy.score.base import ScoreInput, attention_probs, reduce_group


@dataclass(frozen=True)
class ChunkKVScorer:
    """Span-preserving selection: the prompt is cut into chunks of `chunk` contiguous
    tokens, each chunk is scored by the mean attention its real tokens get from the
    last `window` prompt queries (summed over the window, GQA group reduced), and every
    token of a chunk gets its chunk's score, so chunks are kept or dropped whole (only
    the last chunk a budget reaches can be cut). Chunks are aligned to the end of the
    prompt, so a left-padded batch shares them.

    Why: single-token scores keep the tokens a question attends to (the first and
    last digits of an answer) and drop the ones between; a chunk keeps the span.
    Scores are per kv head (kvpress's ChunkKVPress sums over heads: layer-wise), so
    Ada-KV can still share the layer's budget unevenly; chunk 10 is the paper's default.
    """

    chunk: int = 10
    group_reduce: str = "mean"
    name: str = "chunkkv"
    observes_queries: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.chunk < 1:
            raise ValueError(f"ChunkKV chunk size must be >= 1 token, got {self.chunk}")

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        b, hkv, t, _ = x.keys.shape
        w = min(x.window, t)
        tokens = reduce_group(attention_probs(x, t - w, t).sum(dim=3), self.group_reduce)
        n_chunks = -(-t // self.chunk)
        pad = n_chunks * self.chunk - t  # the partial chunk is the first one
        sums = F.pad(tokens, (pad, 0)).view(b, hkv, n_chunks, self.chunk).sum(dim=-1)
        real = F.pad(x.valid.float(), (pad, 0)).view(b, 1, n_chunks, self.chunk).sum(dim=-1)
        means = sums / real.clamp_min(1)
        return means.repeat_interleave(self.chunk, dim=-1)[..., pad:]
