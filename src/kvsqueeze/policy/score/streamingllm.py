"""StreamingLLM: Xiao et al., "Efficient Streaming Language Models with Attention
Sinks", arXiv 2309.17453."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvsqueeze.policy.score.base import ScoreInput


@dataclass(frozen=True)
class StreamingLLMScorer:
    """Recency: later tokens score higher. The attention sinks (first tokens) are
    protected by the policy's `sinks`, so sinks + most recent tokens are kept."""

    name: str = "streamingllm"
    observes_queries: ClassVar[bool] = False

    def __call__(self, x: ScoreInput) -> torch.Tensor:
        b, hkv, t, _ = x.keys.shape
        return torch.arange(t, device=x.keys.device, dtype=torch.float32).expand(b, hkv, t)
