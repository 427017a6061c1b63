"""SamplingParams: how one request picks its tokens and when it stops (vLLM's names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this temperature sampling is greedy (vLLM's rule): dividing logits by a tinier
# one overflows to inf and the draw has no distribution left.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """temperature 0 (or below GREEDY_BELOW) is greedy. top_k 0 or -1 and top_p 1.0 switch those filters off.
    `seed` makes a request's sampling reproducible whatever else runs beside it.
    Generation stops at max_tokens, at an EOS token (unless ignore_eos), at any of
    `stop_token_ids`, or when the text ends with any of `stop` (the stop string is
    not returned)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW
