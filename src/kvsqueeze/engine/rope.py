"""Rotary position embeddings as in transformers' Llama family: default, linear and llama3 scaling.

The cos/sin table is computed once in fp32 for every position the model allows, the way
transformers computes it per step (positions times inverse frequencies in fp32), so a table
lookup gives bit-identical values.
"""

from __future__ import annotations

import math

import torch


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """The [head_dim / 2] inverse frequencies, with the checkpoint's rope scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope scaling {rope_type!r} is not supported (default, linear, llama3 are)")


class RotaryEmbedding:
    """cos/sin tables for positions [0, max_positions), applied to the flat [T, heads, d] layout."""

    def __init__(
        self, head_dim: int, theta: float, scaling: dict | None, max_positions: int, dtype: torch.dtype, device
    ) -> None:
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        # [max_positions, 1, d/2]: the middle axis broadcasts over heads.
        self.cos = freqs.cos().to(dtype=dtype, device=device)[:, None, :]
        self.sin = freqs.sin().to(dtype=dtype, device=device)[:, None, :]

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, d/2] of the tokens' positions; gathered once per step, used by every layer."""
        return self.cos[positions], self.sin[positions]
