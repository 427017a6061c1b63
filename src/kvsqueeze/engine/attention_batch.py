"""The metadata of one flat forward: tokens of many sequences, concatenated (vLLM style).

Sequence i owns rows `cu_seqlens_q[i]:cu_seqlens_q[i+1]` of the flat token batch. Its new
tokens sit at positions `num_cached[i] .. num_cached[i] + query_lens[i] - 1`: a chunk of a
prompt (prefill) or one generated token (decode) that follows what the cache already holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class AttentionBatch:
    """One engine step. Python lists for per-sequence loops (no device sync); tensors for the forward."""

    seq_ids: list[int]
    query_lens: list[int]  # new tokens of each sequence in this step
    num_cached: list[int]  # tokens each sequence already has in the cache before this step
    is_prefill: list[bool]  # the new tokens are (a chunk of) the prompt, not a generated token
    is_last_chunk: list[bool]  # this step finishes the prompt (always True in decode): compress now
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    cu_seqlens_q: torch.Tensor  # [S + 1] int32, query start offsets into the flat batch
    context_lens: torch.Tensor  # [S] int32, num_cached + query_lens: keys each sequence attends to
    logits_indices: torch.Tensor  # [S] int64, the last row of each sequence: the only rows that need logits
    # SwiftKV: how many last tokens of each sequence run the layers above kv_layer (None: all)
    tail_lens: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(
        cls,
        seq_ids: list[int],
        token_ids: list[list[int]],
        num_cached: list[int],
        is_prefill: list[bool] | None = None,
        is_last_chunk: list[bool] | None = None,
        device: torch.device | str = "cpu",
        tail_lens: list[int] | None = None,
    ) -> AttentionBatch:
        """A batch from each sequence's new tokens and how many it has cached already.

        By default a sequence is in prefill when it brings more than one token or has nothing
        cached, and every prefill chunk is the last one; a scheduler that splits prompts says so.
        """
        if not (len(seq_ids) == len(token_ids) == len(num_cached)) or not seq_ids:
            raise ValueError("seq_ids, token_ids and num_cached must be non-empty and of one length")
        query_lens = [len(t) for t in token_ids]
        if min(query_lens) == 0:
            raise ValueError("every sequence in a batch needs at least one new token")
        if is_prefill is None:
            is_prefill = [n > 1 or c == 0 for n, c in zip(query_lens, num_cached, strict=True)]
        if is_last_chunk is None:
            is_last_chunk = [True] * len(seq_ids)
        flat = [t for toks in token_ids for t in toks]
        positions = [p for n, c in zip(query_lens, num_cached, strict=True) for p in range(c, c + n)]
        cu = [0]
        for n in query_lens:
            cu.append(cu[-1] + n)
        return cls(
            seq_ids=list(seq_ids),
            query_lens=query_lens,
            num_cached=list(num_cached),
            is_prefill=list(is_prefill),
            is_last_chunk=list(is_last_chunk),
            input_ids=torch.tensor(flat, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            context_lens=torch.tensor(
                [c + n for c, n in zip(num_cached, query_lens, strict=True)], dtype=torch.int32, device=device
            ),
            logits_indices=torch.tensor(cu[1:], dtype=torch.int64, device=device) - 1,
            tail_lens=tail_lens,
        )


class AttentionBackend(Protocol):
    """Where K/V live and how they are read. The model calls `attend` once per layer per step;
    the backend stores the step's k/v for every sequence (at positions num_cached onwards) and
    returns causal attention of q over each sequence's whole context (cached + new)."""

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """q [T, q_heads, d], k and v [T, kv_heads, d] after RoPE -> out [T, q_heads, d], q's dtype."""
        ...

    def free(self, seq_id: int) -> None:
        """Forget a finished (or preempted) sequence's K/V."""
        ...
