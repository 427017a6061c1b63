"""CompressedLayer: one attention layer's compressed KV cache, without transformers.

The first chunk a layer sees (the prefill) is attended densely; then the policy picks
what each (sequence, kv-head) keeps and only that goes into the store. Later chunks
(decode steps, a continued prompt) are appended to every head and attend over the
store. The layer counts tokens seen per sequence (the logical length) apart from
tokens stored per head (the physical length). Under a cross-layer policy the prefill
is compressed once every layer has had its own (cache/cross_layer.py).

Both the transformers adapter (hf/cache.py) and the serving engine drive this class;
it imports only policy/, store/ and ops/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvsqueeze.cache.cross_layer import CrossLayerPrefill
from kvsqueeze.ops import append_tokens, attend, dense_causal_attention, policy_scores
from kvsqueeze.policy import Policy, ScoreInput
from kvsqueeze.store import FlatKV
from kvsqueeze.store.base import KVStore, StoreMark

# (keys [heads, t, d], values, keep [heads, t], positions [t]) -> a store of the kept entries
StoreFactory = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], KVStore]
# Called with (layer_idx, the dense prefill) before it is compressed: e.g. to record it.
PrefillCallback = Callable[[int, ScoreInput], None]


@dataclass(frozen=True)
class LayerMark:
    """A layer's state as CompressedLayer.mark() saw it, for rollback()."""

    seen: int
    real_tokens: torch.Tensor | None
    store: StoreMark | None


class CompressedLayer:
    """One layer's compressed cache for a batch of sequences (batch folded into heads)."""

    def __init__(
        self,
        policy: Policy,
        layer_idx: int,
        num_layers: int,
        make_store: StoreFactory = FlatKV.from_dense,
        on_prefill: PrefillCallback | None = None,
        cross_layer: CrossLayerPrefill | None = None,
    ) -> None:
        """`cross_layer`, shared by the layers of one cache, is required by a policy that
        allocates across layers: this layer's prefill waits there for the others'."""
        if policy.across_layers and policy.compresses and cross_layer is None:
            raise ValueError(f"{policy.name} allocates across layers: give every layer one shared CrossLayerPrefill")
        self.policy, self.layer_idx, self.num_layers = policy, layer_idx, num_layers
        self.make_store, self.on_prefill, self.cross_layer = make_store, on_prefill, cross_layer
        self.store: KVStore | None = None
        self.seen = 0  # slots seen, padding included: the next chunk's first position
        self.real_tokens: torch.Tensor | None = None  # [batch] unpadded tokens seen
        self.kept_after_prefill: torch.Tensor | None = None  # [batch, kv_heads]
        self.num_kv_heads = 0
        self.element_size = 0  # bytes per element of the model's K/V

    # ------------------------------------------------------------------ state
    @property
    def nbytes(self) -> int:
        """Bytes the store holds now, from its tensors (0 before the prefill)."""
        return 0 if self.store is None else self.store.nbytes

    @property
    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache would hold for the same unpadded tokens."""
        if self.store is None:
            return 0
        per_token = 2 * self.num_kv_heads * self.store.head_dim * self.element_size
        return int(self.real_tokens.sum()) * per_token

    def logical_tokens(self) -> torch.Tensor:
        """Tokens seen per sequence, [batch] (padding excluded)."""
        return self.real_tokens

    def physical_tokens(self) -> torch.Tensor:
        """Tokens stored per (sequence, kv-head), [batch, kv_heads]."""
        return self.store.lengths.view(-1, self.num_kv_heads)

    def reset(self) -> None:
        if self.cross_layer is not None:
            self.cross_layer.discard(self.layer_idx)
        self.store, self.seen, self.real_tokens, self.kept_after_prefill = None, 0, None, None

    def mark(self) -> LayerMark:
        """The layer as it is now, for rollback(): its logical length and its store's
        (a cross-layer prefill still waiting is compressed first)."""
        self.settle()
        real = None if self.real_tokens is None else self.real_tokens.clone()
        return LayerMark(self.seen, real, None if self.store is None else self.store.mark())

    def check_rollback(self, mark: LayerMark) -> None:
        """Raise the ValueError rollback(mark) would, changing nothing."""
        self.settle()
        prefill_since = mark.store is None and self.store is not None
        if prefill_since or mark.seen > self.seen:
            raise ValueError(
                f"layer {self.layer_idx} holds {self.seen} tokens and cannot roll back to a mark of {mark.seen}: "
                "a rollback only undoes chunks stepped after its mark"
            )
        if self.store is not None:
            self.store.check_rollback(mark.store)

    def rollback(self, mark: LayerMark) -> None:
        """Undo the chunks stepped since mark() gave `mark`: drop the entries they
        appended to every head and count their tokens as never seen, so the layer
        attends, and positions the next chunk, as it did then. Only appends are undone:
        a mark taken before the prefill, or past what the layer holds, is refused."""
        self.check_rollback(mark)
        if self.store is not None:
            self.store.rollback(mark.store)
        self.seen = mark.seen
        self.real_tokens = None if mark.real_tokens is None else mark.real_tokens.clone()

    def rollback_room(self) -> int | None:
        """Tokens that may be stepped from now on and still be undone by rollback(mark());
        None: any number."""
        self.settle()
        return None if self.store is None else self.store.rollback_room()

    def settle(self) -> None:
        """Build the store now if this layer's prefill still waits for a cross-layer allocation."""
        if self.store is None and self.cross_layer is not None:
            self.cross_layer.flush()

    # ------------------------------------------------------------------ compute
    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor | None,
        scaling: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Attend one chunk and store its keys/values: the prefill if the layer is empty,
        a step otherwise. query [b, q_heads, q, d], keys/values [b, kv_heads, q, d],
        valid [b, q] (False on padding) or None. Returns [b, q_heads, q, d]."""
        if self.seen > 0:
            positions = torch.arange(self.seen, self.seen + query.shape[2], device=query.device)
            return self.step(query, keys, values, positions, valid, scaling, sliding_window)
        out = dense_causal_attention(query, keys, values, valid, scaling, sliding_window)
        if valid is None:
            valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
        # A layer that ran only the last prompt tokens (SwiftKV's upper layers) has queries
        # for those alone; scorers find queries by slot, so earlier slots get zero queries.
        observed = F.pad(query, (0, 0, keys.shape[2] - query.shape[2], 0))
        x = ScoreInput(observed, keys, values, valid, scaling, self.policy.window, sliding_window)
        if self.on_prefill is not None:
            self.on_prefill(self.layer_idx, x)
        self.prefill(x)
        return out

    def prefill(self, x: ScoreInput, scores: torch.Tensor | None = None) -> None:
        """Compress a dense prefill into this empty layer: keep what the policy picks.
        `scores` may pass the policy scorer's output for `x`, computed earlier. Under a
        cross-layer policy the prefill waits for the other layers' (see settle())."""
        if self.seen > 0:
            raise RuntimeError(f"layer {self.layer_idx} already holds a prefill; reset() it first")
        if scores is None and self.policy.compresses:
            scores = policy_scores(self.policy.scorer, x)  # fused on GPU for SnapKV
        if self.cross_layer is not None and self.policy.compresses:
            self.seen = x.keys.shape[2]  # the logical length counts from now; the store comes later
            self.cross_layer.add(self, x, scores)
            return
        self.store_prefill(x, self.policy.keep_mask(x, self.layer_idx, self.num_layers, scores))

    def store_prefill(self, x: ScoreInput, keep: torch.Tensor) -> None:
        """Store the entries keep[batch, kv_heads, tokens] of the dense prefill `x`."""
        t = x.keys.shape[2]
        positions = torch.arange(t, device=x.keys.device)
        self.num_kv_heads, self.element_size = x.keys.shape[1], x.keys.element_size()
        self.store = self.make_store(x.keys.flatten(0, 1), x.values.flatten(0, 1), keep.flatten(0, 1), positions)
        self.kept_after_prefill = keep.sum(dim=-1)
        self.real_tokens = x.valid.sum(dim=-1)
        self.seen = t

    def step(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None,
        scaling: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Append a chunk of q tokens at `positions` [q] to every head (skipping those
        with valid[b, q] False) and attend over the store. Shapes as in forward()."""
        self.settle()
        if self.store is None:
            raise RuntimeError(f"layer {self.layer_idx} has no prefill yet: call prefill() or forward() first")
        q_len = query.shape[2]
        head_valid = None if valid is None else valid.repeat_interleave(self.num_kv_heads, dim=0)
        append_tokens(self.store, keys.flatten(0, 1), values.flatten(0, 1), positions, head_valid)
        out = self.read(query, positions, scaling, sliding_window)
        added = q_len if valid is None else valid.sum(dim=-1)
        self.real_tokens = self.real_tokens + added
        self.seen += q_len
        return out

    def read(
        self, query: torch.Tensor, positions: torch.Tensor, scaling: float, sliding_window: int | None = None
    ) -> torch.Tensor:
        """Attend queries at `positions` [q] over the store as it is, storing nothing (step()
        after appending; a layer that shares this cache, e.g. SwiftKV's AcrossKV)."""
        self.settle()
        b, hq, q_len, d = query.shape
        hkv = self.num_kv_heads
        grouped = query.reshape(b * hkv, hq // hkv, q_len, d)
        out = attend(grouped, self.store, positions.expand(b * hkv, q_len), scaling, sliding_window)
        return out.view(b, hq, q_len, d)
