"""What every scorer sees, and the attention-probability helper several of them share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from kvsqueeze.policy.score.kvzip import ReconstructionChunk


@dataclass(frozen=True)
class ScoreInput:
    """The prefill of one layer, as the scorers see it.

    queries: [batch, q_heads, tokens, head_dim], after RoPE.
    keys, values: [batch, kv_heads, tokens, head_dim], after RoPE.
    valid: [batch, tokens] bool, False on padding slots.
    scaling: the softmax scale the model uses (usually head_dim ** -0.5).
    window: the number of last prompt queries that observe the keys (SnapKV).
    sliding_window: the model's attention window for this layer, or None: a query
        sees only keys fewer than `sliding_window` positions behind it, so a key the
        window already hides from the last prompt query can never be attended again.
    reconstruction: what the model made while reconstructing the context after the
        prefill (KVzip, score/kvzip.py); empty unless a path ran it.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    scaling: float
    window: int = 32
    sliding_window: int | None = None
    reconstruction: tuple[ReconstructionChunk, ...] = ()

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def require_left_padding(self) -> None:
        """Raise ValueError unless every sequence's real tokens are its last slots:
        the window, the sinks and the scorers' last queries are found by slot."""
        if bool((self.valid[:, 1:] < self.valid[:, :-1]).any()):
            raise ValueError(
                "kvsqueeze policies need left padding (real tokens last in each row); "
                "this batch is right-padded or has holes: pad on the left (tokenizer.padding_side = 'left')"
            )

    def visible(self) -> torch.Tensor:
        """[batch, tokens] bool: real tokens the last prompt query still sees. A key
        the sliding window hides from it is hidden from every later query too."""
        if self.sliding_window is None:
            return self.valid
        t = self.valid.shape[-1]
        recent = torch.arange(t, device=self.valid.device) > t - 1 - self.sliding_window
        return self.valid & recent


class Scorer(Protocol):
    """A scorer maps a prefill to scores[batch, kv_heads, tokens]; higher means keep.
    `observes_queries`: it scores keys by what prompt queries attend to, so a policy
    must protect (and observe) at least the last prompt token: window >= 1."""

    name: str
    observes_queries: ClassVar[bool]

    def __call__(self, x: ScoreInput) -> torch.Tensor: ...


def attention_probs(x: ScoreInput, q_start: int, q_end: int) -> torch.Tensor:
    """Causal softmax attention of queries [q_start, q_end) to all keys, in fp32,
    limited to the sliding window (query q sees key k when q - k < sliding_window)
    when the layer has one.

    Returns probs[batch, kv_heads, group, queries, tokens]. GQA is handled by folding
    the group into the query axis, so keys are never repeated. Padding queries get
    all-zero rows.
    """
    b, hq, t, d = x.queries.shape
    hkv, g, nq = x.keys.shape[1], x.group_size, q_end - q_start
    q = x.queries[:, :, q_start:q_end].float().reshape(b, hkv, g * nq, d)
    logits = (q @ x.keys.float().transpose(-1, -2)).mul_(x.scaling).view(b, hkv, g, nq, t)
    device = x.keys.device
    padded = not bool(x.valid.all())
    # Without padding or a sliding window only keys from the first query on can be hidden
    # (causal): masking just those columns saves a pass over the rest.
    first = 0 if padded or x.sliding_window is not None else q_start
    q_pos = torch.arange(q_start, q_end, device=device)
    k_pos = torch.arange(first, t, device=device)
    behind = q_pos[:, None] - k_pos[None, :]
    allowed = behind >= 0
    if x.sliding_window is not None:
        allowed = allowed & (behind < x.sliding_window)  # as transformers' sliding_window_overlay
    allowed = allowed[None] & x.valid[:, None, first:]  # [b, nq, t - first]
    logits[..., first:].masked_fill_(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    # Only a padding query sees no key (a real one sees itself): its row is NaN -> 0.
    return probs.nan_to_num_(0.0) if padded else probs


GROUP_REDUCTIONS = ("mean", "max")


def reduce_group(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Reduce [batch, kv_heads, group, tokens] over the GQA group by 'mean' or 'max'."""
    if how == "mean":
        return scores.mean(dim=2)
    if how == "max":
        return scores.amax(dim=2)
    raise ValueError(f"unknown GQA group reduction {how!r}: use 'mean' or 'max'")
