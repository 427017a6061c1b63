"""PagedCompressedCache: the engine's attention backend. It stores each step's keys
and values in the BlockManager's per-head blocks, attends over them, and compresses a
sequence's prompt with its policy when the prompt's last chunk has run.

Per layer and step: every prefill chunk (or a recomputed sequence's continuation)
is appended to its sequence's blocks and attends over them with a causal mask by
position; then all one-token decode rows of the step are appended and attend in
one batched call over a single gather of their blocks. When a chunk completes a
prompt, the layer's policy scores the whole prompt (its queries, kept since the
first chunk, and its keys), exactly as the HF path does after a dense prefill, and
evicts; the freed blocks go back to the pool at once. With `compress_chunks`, every
prompt chunk is compressed as soon as it has run instead (bounded peak KV).

A KVzip policy (arXiv 2505.23416) waits instead for the sequence's reconstruction rows
(engine/kvzip.py), which run in later steps: a row attends over the uncompressed
prompt and its own keys, stores nothing, and leaves each layer its queries and keys;
after the last row every layer scores with them and evicts.

With a quantizing BlockManager (KIVI, arXiv 2402.02750) the stores are
PagedQuantizedKV: the prompt stays in full precision until the policy has scored
it, then its kept entries are quantized (`quantize` instead of `evict`; a policy that
keeps everything quantizes the whole prompt when it ends), decode steps append to
each store's full-precision residual, and attention reads the pages a few at a time
through ops/paged_quantized_attention.py, never the whole cache in full precision.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvsqueeze.engine.block_manager import BlockManager
from kvsqueeze.engine.cross_layer import CrossLayerCompression
from kvsqueeze.engine.decode_eviction import evict_heads
from kvsqueeze.engine.scheduler import ScheduledChunk
from kvsqueeze.ops import dense_causal_attention, policy_scores
from kvsqueeze.ops.cpu_extension import cpu_kernels_available
from kvsqueeze.ops.cpu_paged_decode import append_decode_cpu, paged_decode_cpu
from kvsqueeze.ops.cpu_quantized_decode import quantized_decode_cpu, quantized_kernel_available
from kvsqueeze.ops.padded_attention import padded_attention
from kvsqueeze.ops.paged_quantized_attention import paged_quantized_attention
from kvsqueeze.policy import ScoreInput
from kvsqueeze.policy.score import ReconstructionChunk
from kvsqueeze.store import BlockPool, PagedKV
from kvsqueeze.store.paged_kv import append_step, step_slots
from kvsqueeze.store.paged_quantized_kv import append_step as append_quantized_step


@dataclass
class DecodeRows:
    """The step's one-token rows that attend over what their sequence has stored (every
    layer of a step has the same ones, so they are worked out once per step)."""

    chunks: list[int]  # indices into the step's chunks
    others: list[int]  # the step's other chunks (prompt chunks), each attended on its own
    starts: list[int]  # where every chunk's rows start in the flat token batch (and the end)
    rows: slice | torch.Tensor  # their rows of the flat token batch (a slice when contiguous)
    layers: list[list[PagedKV | None]]  # each one's stores, per cache entry
    positions: torch.Tensor  # [rows] int64, each new token's position
    capped: list[int]  # positions in `chunks` of sequences decoding under a per-head cap

    @classmethod
    def of(cls, chunks: list[ScheduledChunk], blocks: BlockManager) -> DecodeRows:
        starts = list(itertools.accumulate((c.num_tokens for c in chunks), initial=0))
        picked = [
            i
            for i, c in enumerate(chunks)
            if c.num_tokens == 1 and not c.scored and not c.repeats and c.seq.seq_id in blocks.kv
        ]
        return cls(
            chunks=picked,
            others=sorted(set(range(len(chunks))) - set(picked)),
            starts=starts,
            rows=_rows([starts[i] for i in picked]),
            layers=[blocks.kv[chunks[i].seq.seq_id] for i in picked],
            positions=torch.tensor([chunks[i].start for i in picked], dtype=torch.int64),
            capped=[j for j, i in enumerate(picked) if chunks[i].seq.max_kv_tokens is not None],
        )


def _rows(rows: list[int]) -> slice | torch.Tensor:
    """Rows of a tensor: a slice (a view) when they are contiguous, as decode rows usually are."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, dtype=torch.int64)


class PagedCompressedCache:
    def __init__(
        self,
        blocks: BlockManager,
        num_heads: int,
        scaling: float,
        sliding_windows: Sequence[int | None],
        compress_chunks: bool = False,
        kv_entries: Sequence[int] | None = None,
    ) -> None:
        self.blocks, self.compress_chunks = blocks, compress_chunks
        self.num_heads, self.scaling, self.sliding_windows = num_heads, scaling, tuple(sliding_windows)
        # Layer -> the BlockManager entry holding its K/V (SwiftKV's AcrossKV layers share one).
        self.kv_entries = tuple(kv_entries) if kv_entries is not None else tuple(range(blocks.num_layers))
        self.num_layers = len(self.kv_entries)
        self.quantized = blocks.quant is not None
        if self.quantized and compress_chunks:
            raise ValueError("per-chunk compression is not supported with a quantized KV cache (kv bits < 16)")
        # Decode on the CPU reads the blocks in place and appends through the C++ kernels (ops/csrc).
        on_cpu = blocks.pool.device.type == "cpu"
        self.cpu_kernels = on_cpu and not self.quantized and cpu_kernels_available()
        # Quantized decode on the CPU reads the pages in place (csrc/quantized_decode.cpp).
        self.quantized_kernel = on_cpu and self.quantized and quantized_kernel_available()
        self.chunks: list[ScheduledChunk] = []
        self.decode = DecodeRows.of([], blocks)
        self._prompt_queries: dict[tuple[int, int], list[torch.Tensor]] = {}  # (seq, layer) -> [n, hq, d] chunks
        self._recent: dict[tuple[int, int], torch.Tensor] = {}  # (seq, layer) -> last queries [hq, w, d]
        self._rebuilt: dict[tuple[int, int], list[ReconstructionChunk]] = {}  # (seq, layer) -> KVzip rows so far
        self._evictions: list[Callable[[], object]] = []  # waiting for the entry's last reader
        self.cross_layer = CrossLayerCompression(len(set(self.kv_entries)), self.num_layers)
        blocks.on_free.append(self._forget)

    def begin_step(self, chunks: list[ScheduledChunk]) -> None:
        """The chunks the next forward runs, in the order of its flat token batch."""
        self.chunks = chunks
        self.decode = DecodeRows.of(chunks, self.blocks)

    def free(self, seq_id: int) -> None:
        """Return a finished or preempted sequence's blocks (and forget its pending queries)."""
        self.blocks.free(seq_id)

    def _forget(self, seq_id: int) -> None:
        self.cross_layer.forget(seq_id)
        for layer in range(self.num_layers):
            self._prompt_queries.pop((seq_id, layer), None)
            self._recent.pop((seq_id, layer), None)
            self._rebuilt.pop((seq_id, layer), None)

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: object = None,
        query_lens: Sequence[int] | None = None,
        writes: bool = True,
    ) -> torch.Tensor:
        """k/v [T, kv_heads, d] for the step's flat tokens, q [T', q_heads, d]: every token's
        query, or (SwiftKV's upper layers) only the last query_lens[i] of chunk i's. With
        writes=False (an AcrossKV layer that is not its group's first) the layer attends
        over the entry its group's first layer stored this step and stores nothing.
        Returns [T', q_heads, d]."""
        out = torch.empty_like(q)
        entry, decode, starts = self.kv_entries[layer_idx], self.decode, self.decode.starts
        query_starts = starts if query_lens is None else list(itertools.accumulate(query_lens, initial=0))
        for i in decode.others:
            chunk = self.chunks[i]
            span, q_span = slice(starts[i], starts[i + 1]), slice(query_starts[i], query_starts[i + 1])
            store = self.blocks.layer(chunk.seq.seq_id, entry)
            if chunk.repeats:
                out[q_span] = self._repeat(layer_idx, chunk, q[q_span], k[span], v[span], store)
            else:
                out[q_span] = self._chunk(layer_idx, chunk, q[q_span], k[span], v[span], store, writes)
        if decode.chunks:
            # SwiftKV's upper layers run fewer query rows than key rows before a decode row.
            q_rows = decode.rows if query_lens is None else _rows([query_starts[i] for i in decode.chunks])
            stores = [layers[entry] for layers in decode.layers]
            if writes and self.quantized:
                new_k, new_v = k[decode.rows].flatten(0, 1), v[decode.rows].flatten(0, 1)
                append_quantized_step(stores, new_k, new_v, decode.positions)
                for j, store in enumerate(stores):
                    if self.chunks[decode.chunks[j]].ends_prompt:  # a prompt's last chunk of one token
                        self._later(store.quantize)
            elif writes:
                new_k, new_v = k[decode.rows].flatten(0, 1), v[decode.rows].flatten(0, 1)
                append_step(stores, new_k, new_v, decode.positions, append_decode_cpu if self.cpu_kernels else None)
            queries = q[q_rows]
            out[q_rows] = self._decode(queries, stores, decode.positions, self.sliding_windows[layer_idx])
            if writes:
                for j in decode.capped:
                    chunk = self.chunks[decode.chunks[j]]
                    self._later(self._bound, layer_idx, chunk, stores[j], queries[j : j + 1])
        if layer_idx + 1 == self.num_layers or self.kv_entries[layer_idx + 1] != entry:
            for evict in self._evictions:  # every layer that reads the entry has attended
                evict()
            self._evictions.clear()
        return out

    def _later(self, evict: Callable[..., object], *args: object) -> None:
        """Evict from an entry once the last layer reading it has attended this step: an
        AcrossKV group's other layers see what its first layer saw (as in the HF path)."""
        self._evictions.append(functools.partial(evict, *args))

    def _bound(self, layer_idx: int, chunk: ScheduledChunk, store: PagedKV, queries: torch.Tensor) -> None:
        """Decoding under a per-head cap: remember the recent queries and evict from heads
        that pass the cap (decode_eviction.py)."""
        seq = chunk.seq
        if seq.max_kv_tokens is None:
            return
        key = (seq.seq_id, layer_idx)
        recent = queries.transpose(0, 1)  # [hq, n, d]
        if key in self._recent:
            recent = torch.cat([self._recent[key], recent], dim=1)
        self._recent[key] = recent[:, -seq.policy.window :]
        cap = seq.max_kv_tokens  # cut to 7/8 of the cap: eviction runs once every cap/8 steps
        evict_heads(seq.policy, layer_idx, self.num_layers, store, self._recent[key], cap, cap - cap // 8, self.scaling)

    def _chunk(
        self,
        layer_idx: int,
        chunk: ScheduledChunk,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        store: PagedKV | None,
        writes: bool = True,
    ) -> torch.Tensor:
        """Store a chunk of one sequence (unless `writes` is False) and attend its queries,
        the chunk's last q.shape[0] ones, over everything stored."""
        m, hq, d = q.shape
        n, hkv = k.shape[0], k.shape[1]
        positions = torch.arange(chunk.start, chunk.end)
        keys, values = k.transpose(0, 1), v.transpose(0, 1)  # [hkv, n, d]
        window = self.sliding_windows[layer_idx]
        queries = q.transpose(0, 1)  # [hq, m, d]
        first = store is None
        if first:
            store = self.blocks.join(chunk.seq.seq_id, self.kv_entries[layer_idx], keys, values, positions)
        elif writes:
            store.append(keys, values, positions)
        if first and m == n:  # the first chunk, every query: plain causal attention over itself
            out = dense_causal_attention(queries[None], keys[None], values[None], None, self.scaling, window)[0]
        elif self.quantized:
            grouped = queries.reshape(hkv, hq // hkv, m, d)
            q_pos = positions[n - m :].expand(hkv, m)
            out = paged_quantized_attention(grouped, [store], q_pos, self.scaling, window).reshape(hq, m, d)
        else:
            slots, live = store.live_slots()
            grouped = queries.reshape(hkv, hq // hkv, m, d)
            q_pos = positions[n - m :].expand(hkv, m)
            out = _gathered_attention(grouped, store.pool, slots, live, q_pos, self.scaling, window).reshape(hq, m, d)
        recomputed = chunk.start >= chunk.seq.num_prompt_tokens  # a recomputed sequence's generated tokens
        if writes and self.quantized and chunk.ends_prompt and not chunk.scored:
            self._later(store.quantize)  # no policy scores it: the whole prompt is quantized
        if not writes or not (chunk.scored or recomputed):
            return out.transpose(0, 1)
        if m < n:  # prompt queries the layer did not run (SwiftKV) observe nothing: zeros
            q = torch.cat([q.new_zeros(n - m, hq, d), q])
        if chunk.scored and self.compress_chunks:
            self._later(self._compress_chunk, layer_idx, chunk, store, q)
        elif chunk.scored:
            key = (chunk.seq.seq_id, layer_idx)
            self._prompt_queries.setdefault(key, []).append(q)
            if chunk.compresses and not chunk.seq.repeat_rows:  # KVzip: after the reconstruction (_repeat)
                queries = torch.cat(self._prompt_queries.pop(key))
                # A prompt that ran as one chunk is these keys and values: no gather of the store.
                dense = (keys, values) if first else None
                self._later(self._compress, layer_idx, chunk, store, queries, dense)
                self._later(self._bound, layer_idx, chunk, store, queries)
        else:
            self._later(self._bound, layer_idx, chunk, store, q)
        return out.transpose(0, 1)

    def _repeat(
        self, layer_idx: int, chunk: ScheduledChunk, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, store: PagedKV
    ) -> torch.Tensor:
        """A KVzip reconstruction row, q/k/v [r, heads, d]: attend over the uncompressed
        context the store holds (every head whole, positions 0..t-1) and the row itself,
        causally, as the HF path's forward over the prompt's cache does; keep the row's
        queries and keys for the scorer and store nothing. After the sequence's last
        row, score and evict."""
        seq = chunk.seq
        row = seq.repeat_rows[seq.num_repeated]
        context_keys, context_values = store.padded()[:2]  # [hkv, t, d]
        keys = torch.cat([context_keys.to(k.dtype), k.transpose(0, 1)], dim=1)
        values = torch.cat([context_values.to(v.dtype), v.transpose(0, 1)], dim=1)
        queries = q.transpose(0, 1)  # [hq, r, d]
        window = self.sliding_windows[layer_idx]
        out = dense_causal_attention(queries[None], keys[None], values[None], None, self.scaling, window)[0]
        key = (seq.seq_id, layer_idx)
        rebuilt = self._rebuilt.setdefault(key, [])
        rebuilt.append(ReconstructionChunk(row.start, row.end, queries[None], k.transpose(0, 1)[None]))
        if chunk.last_repeat:
            prompt_queries = torch.cat(self._prompt_queries.pop(key))
            self._later(self._compress, layer_idx, chunk, store, prompt_queries, None, tuple(self._rebuilt.pop(key)))
        return out.transpose(0, 1)

    def _compress(
        self,
        layer_idx: int,
        chunk: ScheduledChunk,
        store: PagedKV,
        queries: torch.Tensor,
        dense: tuple[torch.Tensor, torch.Tensor] | None = None,
        reconstruction: tuple[ReconstructionChunk, ...] = (),
    ) -> None:
        """Score the whole prompt, or its shared prefix (all heads hold it uncompressed), and
        evict. `dense`: the keys and values [hkv, t, d] the store holds, when at hand;
        `reconstruction`: a KVzip policy's rows (_repeat)."""
        policy = chunk.seq.policy
        keys, values = dense if dense is not None else store.padded()[:2]  # [hkv, t, d]
        t = keys.shape[1]
        x = ScoreInput(
            queries.transpose(0, 1)[None],
            keys[None],
            values[None],
            torch.ones(1, t, dtype=torch.bool, device=keys.device),
            self.scaling,
            policy.window,
            self.sliding_windows[layer_idx],
            reconstruction,
        )
        scores = policy_scores(policy.scorer, x)
        apply = store.quantize if self.quantized else store.evict  # quantize: evict, then quantize what is kept
        if policy.across_layers:  # every layer's prefill first, then one ranking over them all
            self.cross_layer.add(chunk.seq.seq_id, policy, layer_idx, x, scores, apply)
        else:
            apply(policy.keep_mask(x, layer_idx, self.num_layers, scores)[0])

    def _compress_chunk(self, layer_idx: int, chunk: ScheduledChunk, store: PagedKV, q: torch.Tensor) -> None:
        """Per-chunk compression: after each chunk, cut every head to the layer's budget
        for the tokens seen so far, scored by the chunk's own last `window` queries, so a
        long prompt's KV never holds much more than its budget plus one chunk. Each head
        is cut on its own (uniform allocation: Ada-KV's cross-head ranking needs the
        heads aligned, as they are only when the whole prompt is compressed at once)."""
        policy = chunk.seq.policy
        seen = torch.tensor([chunk.end])
        target = int(policy.schedule(policy.budget.per_head(seen), layer_idx, self.num_layers, policy.window, seen)[0])
        recent = q.transpose(0, 1)[:, -policy.window :]  # [hq, w, d]
        evict_heads(policy, layer_idx, self.num_layers, store, recent, target, target, self.scaling)
        if chunk.compresses:
            self._bound(layer_idx, chunk, store, q)

    def _decode(
        self, q: torch.Tensor, stores: list[PagedKV], positions: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """One new token per sequence: every sequence's heads in one SDPA over one gather."""
        r, hq, d = q.shape
        hkv = stores[0].num_heads
        if self.quantized:
            grouped = q.reshape(r * hkv, hq // hkv, 1, d)
            q_pos = positions.repeat_interleave(hkv)[:, None]
            if self.quantized_kernel:
                out = quantized_decode_cpu(grouped, stores, q_pos, self.scaling, window, window is not None)
            else:
                out = paged_quantized_attention(grouped, stores, q_pos, self.scaling, window)
            return out.view(r, hq, d)
        if self.cpu_kernels:  # reads the blocks in place: no gather
            grouped = q.view(r, hkv, hq // hkv, d)
            return paged_decode_cpu(grouped, stores, positions, self.scaling, window, window is not None).view(r, hq, d)
        slots, live = step_slots(stores)  # [r * hkv, L]
        q_pos = positions.repeat_interleave(hkv)[:, None]  # [r * hkv, 1]
        grouped = q.view(r * hkv, hq // hkv, 1, d)
        out = _gathered_attention(grouped, stores[0].pool, slots, live, q_pos, self.scaling, window, window is not None)
        return out.view(r, hq, d)


def _gathered_attention(
    query: torch.Tensor,
    pool: BlockPool,
    slots: torch.Tensor,
    live: torch.Tensor,
    query_positions: torch.Tensor,
    scaling: float,
    window: int | None,
    masked: bool = True,
) -> torch.Tensor:
    """Attention of query [rows, group, q, d] at query_positions [rows, q] over the pool
    entries slots[rows, L] (live[rows, L] marks real ones); masked=False: every live
    entry is older than the queries and inside any window (a plain decode step)."""
    d = query.shape[-1]
    keys, values = pool.keys.view(-1, d)[slots], pool.values.view(-1, d)[slots]
    positions = pool.positions.view(-1)[slots]
    return padded_attention(query, keys, values, positions, live, query_positions, scaling, window, masked)
