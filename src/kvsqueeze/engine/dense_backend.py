"""The reference attention backend: every sequence keeps its whole K/V, dense, per layer.

It is the oracle of the engine's tests and the `full` (uncompressed) path. Each sequence's
K/V of a layer live in one buffer [kv_heads, capacity, d] that doubles when full, so decode
appends in place instead of re-concatenating the history every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvsqueeze.engine.attention_batch import AttentionBatch


class DenseBackend:
    """Per-sequence dense K/V and torch SDPA (GQA without repeating K/V, causal and sliding masks)."""

    def __init__(
        self, sliding_windows: list[int | None] | tuple[int | None, ...], kv_dtype: torch.dtype | None = None
    ) -> None:
        self.sliding_windows = tuple(sliding_windows)
        self.kv_dtype = kv_dtype  # None: store K/V in the dtype the model computes in
        # seq_id -> per layer (k buffer, v buffer), each [kv_heads, capacity, d]
        self.kv: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}

    def free(self, seq_id: int) -> None:
        self.kv.pop(seq_id, None)

    def nbytes(self) -> int:
        """Bytes held by K/V buffers (capacity, not just filled length)."""
        return sum(k.nbytes + v.nbytes for layers in self.kv.values() for kv in layers if kv for k, v in [kv])

    def store(
        self, layer_idx: int, seq_id: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [n, kv_heads, d] at positions start.. of the sequence; return its buffers."""
        layers = self.kv.setdefault(seq_id, [None] * len(self.sliding_windows))
        end = start + k.shape[0]
        buffers = layers[layer_idx]
        if buffers is None or buffers[0].shape[1] < end:
            cap = max(end, 2 * buffers[0].shape[1] if buffers is not None else 0, 16)
            shape = (k.shape[1], cap, k.shape[2])
            dtype = self.kv_dtype or k.dtype
            new = torch.empty(shape, dtype=dtype, device=k.device), torch.empty(shape, dtype=dtype, device=k.device)
            if buffers is not None:
                new[0][:, :start] = buffers[0][:, :start]
                new[1][:, :start] = buffers[1][:, :start]
            buffers = layers[layer_idx] = new
        buffers[0][:, start:end] = k.transpose(0, 1)
        buffers[1][:, start:end] = v.transpose(0, 1)
        return buffers

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """Store this step's k/v and attend each sequence's queries over its context."""
        window = self.sliding_windows[layer_idx]
        out = torch.empty_like(q)
        start = 0
        for seq_id, n, cached in zip(batch.seq_ids, batch.query_lens, batch.num_cached, strict=True):
            end = start + n
            kb, vb = self.store(layer_idx, seq_id, cached, k[start:end], v[start:end])
            ctx = cached + n
            # Keys older than the window of the first query are never seen: skip them.
            first = max(0, cached - window + 1) if window is not None else 0
            # 4-D inputs: torch's CPU flash kernel takes only those (3-D falls back to the slow math path).
            ks, vs = kb[None, :, first:ctx], vb[None, :, first:ctx]
            # With 16-bit KV under fp32 compute, cast the few queries, not the whole context.
            qs = q[start:end].to(kb.dtype)
            if n == 1:
                # One query per head: a kv head's group of query heads are its queries, with no mask.
                # Several times faster than enable_gqa in bf16, as it reads each kv head once.
                o = F.scaled_dot_product_attention(qs.view(1, kb.shape[0], -1, qs.shape[-1]), ks, vs)
                out[start:end] = o.view(q.shape[1:])
            else:
                mask, causal = None, False
                if first == 0 and cached == 0 and (window is None or window >= n):
                    causal = True  # the chunk is the whole context: SDPA's own causal path
                else:
                    qpos = torch.arange(cached, ctx, device=q.device)[:, None]
                    kpos = torch.arange(first, ctx, device=q.device)[None, :]
                    mask = kpos <= qpos
                    if window is not None:
                        mask &= kpos > qpos - window
                qs = qs.transpose(0, 1)[None]  # [1, q_heads, n, d]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=causal, enable_gqa=True)
                out[start:end] = o[0].transpose(0, 1)
            start = end
        return out
