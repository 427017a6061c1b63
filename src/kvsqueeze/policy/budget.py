"""How many tokens each head may keep: a keep ratio or a fixed token count."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Token counts live in int64 tensors and index math; no model has a context near this.
MAX_TOKENS = 2**31 - 1


@dataclass(frozen=True)
class Budget:
    """Per-head budget. Exactly one of `keep` (fraction of the prompt, in (0, 1]) or
    `tokens` (tokens per head, >= 1) is set."""

    keep: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.keep is None) == (self.tokens is None):
            raise ValueError("give exactly one budget: a keep ratio or a token count per head")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep ratio must be in (0, 1], got {self.keep}")
        if self.tokens is not None and not 1 <= self.tokens <= MAX_TOKENS:
            raise ValueError(f"token budget must be between 1 and {MAX_TOKENS} tokens per head, got {self.tokens}")

    @property
    def is_full(self) -> bool:
        return self.keep == 1.0

    def per_head(self, n_valid: torch.Tensor) -> torch.Tensor:
        """Budget per head for each sequence, from its number of real (unpadded) tokens."""
        if self.keep is not None:
            return torch.round(n_valid.double() * self.keep).long().clamp_min(1)
        return torch.full_like(n_valid, self.tokens)

    def describe(self) -> str:
        return f"keep={self.keep}" if self.keep is not None else f"tokens={self.tokens}"
