"""LLMEngine: one step = schedule, run the model over the flat batch, sample, finish.

It ties the scheduler, the block manager, the compressed paged cache and the model
runner together, and keeps the numbers the server and the benchmark report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvsqueeze.engine.attention_batch import AttentionBatch
from kvsqueeze.engine.block_manager import BlockManager
from kvsqueeze.engine.detokenizer import take_delta, update_text
from kvsqueeze.engine.kv_cache import PagedCompressedCache
from kvsqueeze.engine.kvzip import context_rows
from kvsqueeze.engine.metrics import EngineMetrics
from kvsqueeze.engine.model_runner import ModelRunner, resolve_dtype
from kvsqueeze.engine.output import CompletionOutput, RequestOutput
from kvsqueeze.engine.sampler import sample
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.engine.scheduler import ScheduledChunk, Scheduler
from kvsqueeze.engine.sequence import Sequence, check_engine_policy
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.policy import Policy, make_policy
from kvsqueeze.policy.reconstruction import CHUNK, needs_reconstruction
from kvsqueeze.store.quantized_kv import KVQuantConfig

_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_bytes(size: int | str) -> int:
    """'1GiB', '512MiB', '2GB' or a number of bytes."""
    if isinstance(size, int):
        value = size
    else:
        text = size.strip().upper()
        digits = text.rstrip("KMGIB")
        unit = text[len(digits) :]
        try:
            value = int(float(digits) * _UNITS[unit])
        except (ValueError, KeyError, OverflowError):
            raise KVSqueezeError(f"cannot read {size!r} as a size: use e.g. 1GiB, 512MiB or a byte count") from None
    if value <= 0:
        raise KVSqueezeError(f"kv memory must be positive, got {size!r}")
    return value


@dataclass
class EngineArgs:
    """Everything that configures an engine. `model` is a Hugging Face model folder."""

    model: str
    policy: str = "full"
    keep: float | None = None
    tokens: int | None = None
    window: int = 32
    alpha: float = 0.2
    kv_memory: int | str = "1GiB"
    dtype: str = "bf16"
    device: str = "cpu"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    max_kv_tokens: int | None = None  # per-head cap while decoding; the policy evicts past it
    compress_chunks: bool = False  # compress each prompt chunk as it runs, not the whole prompt at its end
    # Admit a sequence only when every running sequence's peak footprint fits beside its
    # own (engine/footprint.py): no preemption within max_tokens. False: admit on the next chunk.
    reserve: bool = True
    # KIVI quantization of the stored K/V (arXiv 2402.02750): 16 keeps them in the model's
    # dtype; 8, 4 or 2 bits quantize what the policy kept (keys per channel over groups of
    # kv_group tokens, values per token), the newest kv_residual decoded tokens exact.
    kv_bits: int = 16
    kv_group: int = 32
    kv_residual: int = 128


def engine_quant(args: EngineArgs, swiftkv: bool = False) -> KVQuantConfig:
    """The engine's KV quantization from its args, refusing what it cannot run: bad
    bits, group or residual (KVQuantConfig's errors), and quantization together with
    per-chunk compression or a SwiftKV model."""
    quant = KVQuantConfig(args.kv_bits, args.kv_group, args.kv_residual)
    if quant.quantizes and args.compress_chunks:
        raise KVSqueezeError("--compress-chunks is not supported with a quantized KV cache (kv bits < 16)")
    if quant.quantizes and swiftkv:
        raise KVSqueezeError("SwiftKV models are not supported with a quantized KV cache in the engine (kv bits < 16)")
    return quant


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.runner = ModelRunner(args.model, args.dtype, args.device)
        if self.runner.tokenizer is None:
            raise KVSqueezeError(f"{args.model} has no tokenizer.json; the engine needs one")
        self.tokenizer = self.runner.tokenizer
        cfg = self.runner.config
        self.config = cfg
        self.swiftkv = cfg.num_kv_entries != cfg.num_layers or cfg.kv_layer < cfg.num_layers
        self.quant = engine_quant(args, self.swiftkv)
        self.blocks = BlockManager(
            cfg.num_kv_entries,
            cfg.num_kv_heads,
            cfg.head_dim,
            resolve_dtype(args.dtype),
            args.device,
            parse_bytes(args.kv_memory),
            args.block_size,
            self.quant,
        )
        self.cache = PagedCompressedCache(
            self.blocks,
            cfg.num_heads,
            cfg.head_dim**-0.5,
            cfg.sliding_windows,
            args.compress_chunks,
            [cfg.kv_entry(i) for i in range(cfg.num_layers)],
        )
        self.scheduler = Scheduler(self.blocks, args.max_num_seqs, args.max_num_batched_tokens, args.reserve)
        self.default_policy = make_policy(args.policy, args.keep, args.tokens, window=args.window, alpha=args.alpha)
        check_engine_policy(self.default_policy, args.compress_chunks, self.swiftkv)
        self.metrics = EngineMetrics()
        self.seqs: dict[int, Sequence] = {}
        self.eos_token_ids = set(cfg.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.peak_running = 0
        self.peak_stored_bytes = 0

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def policy_for(self, name: str | None, keep: float | None, tokens: int | None) -> Policy:
        """The engine's policy, or a request's override (name and/or budget)."""
        a = self.args
        if name is None and keep is None and tokens is None:
            return self.default_policy
        if keep is None and tokens is None:  # a policy name alone keeps the engine's budget
            keep, tokens = a.keep, a.tokens
        return make_policy(name or a.policy, keep=keep, tokens=tokens, window=a.window, alpha=a.alpha)

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        policy: Policy | None = None,
        max_kv_tokens: int | None = None,
        prefix: str | list[int] | None = None,
    ) -> Sequence:
        """Queue a request; `policy` and `max_kv_tokens` override the engine's for it.

        `prefix` (a document many requests share) goes before `prompt`: the policy
        compresses it on its own, question-agnostically, and later requests with the
        same prefix and policy reuse its compressed KV instead of prefilling it."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise KVSqueezeError("empty prompt: a request needs at least one token")
        prefix_ids: list[int] = []
        if prefix is not None and self.quant.quantizes:
            raise KVSqueezeError("shared prefixes are not supported with a quantized KV cache (kv bits < 16)")
        if prefix is not None:
            prefix_ids = self.tokenizer.encode(prefix) if isinstance(prefix, str) else list(prefix)
            if not prefix_ids:
                raise KVSqueezeError("empty prefix: give at least one token, or no prefix")
            if isinstance(prompt, str):  # the prompt continues the prefix: no second BOS
                ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            ids = prefix_ids + ids
        if len(ids) + params.max_tokens > self.max_model_len:
            raise KVSqueezeError(
                f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} passes the model's "
                f"context of {self.max_model_len}"
            )
        worst = self.blocks.blocks_for(-1, len(ids) + params.max_tokens)
        if worst > self.blocks.num_blocks:
            raise KVSqueezeError(
                f"a {len(ids)}-token prompt with max_tokens {params.max_tokens} needs up to {worst} KV blocks "
                f"before compression, the pool has {self.blocks.num_blocks}: give more kv memory"
            )
        cap = max_kv_tokens if max_kv_tokens is not None else self.args.max_kv_tokens
        policy = policy or self.default_policy
        check_engine_policy(policy, self.args.compress_chunks, self.swiftkv)
        rows = []
        if needs_reconstruction(policy):  # the context: the shared prefix, else the whole prompt
            chunk = min(CHUNK, self.args.max_num_batched_tokens)
            rows = context_rows(self.tokenizer, ids[: len(prefix_ids) or len(ids)], chunk)
        seq = Sequence(ids, params, policy, max_kv_tokens=cap, prefix_len=len(prefix_ids), repeat_rows=rows)
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")

    def abort_all(self) -> None:
        for seq_id in list(self.seqs):
            self.abort(seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()  # the scheduler forks and copies blocks made inside the forward
    def step(self) -> list[RequestOutput]:
        chunks = self.scheduler.schedule()
        if not chunks:
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("the scheduler could not admit any sequence into an empty pool")
            return []
        started = time.perf_counter()
        batch = self._batch(chunks)
        self.cache.begin_step(chunks)
        logits = self.runner.model.forward(batch, self.cache)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        seqs = [chunks[i].seq for i in sampling]
        tokens = sample(logits[sampling], [s.params for s in seqs], [s.generator for s in seqs]) if seqs else []
        for c in chunks:
            # A prefix is cached compressed: after its last chunk, or a KVzip policy's last reconstruction row.
            if c.seq.prefix_len and (c.last_repeat or (c.compresses and not c.seq.repeat_rows)):
                self.blocks.cache_prefix(c.seq.seq_id, c.seq.prefix_key)
            if c.repeats:
                c.seq.num_repeated += 1
            else:
                c.seq.num_computed = c.end
        now = time.perf_counter()
        outputs = [self._advance(seq, token, now) for seq, token in zip(seqs, tokens, strict=True)]
        self._record(chunks, len(tokens), now - started)
        return outputs

    def _batch(self, chunks: list[ScheduledChunk]) -> AttentionBatch:
        return AttentionBatch.build(
            [c.seq.seq_id for c in chunks],
            [c.token_ids for c in chunks],
            [c.start for c in chunks],
            is_prefill=[c.repeats or c.start < c.seq.num_prompt_tokens for c in chunks],
            is_last_chunk=[not c.repeats and (c.ends_prompt or c.start >= c.seq.num_prompt_tokens) for c in chunks],
            device=self.runner.device,
            tail_lens=[self._tail(c) for c in chunks] if self.config.kv_layer < self.config.num_layers else None,
        )

    def _tail(self, chunk: ScheduledChunk) -> int:
        """SwiftKV: the chunk's last tokens that run the upper layers. One (the token sampled
        from, or a mid-prompt chunk's last: cheap, and the forward gives every sequence a
        row), or the policy's window when the policy compresses after this chunk, scoring
        with its last queries."""
        observed = chunk.scored and (chunk.compresses or self.args.compress_chunks)
        return min(chunk.num_tokens, chunk.seq.policy.window) if observed else 1

    def _advance(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        """Append a sampled token; finish the sequence if it is done."""
        if seq.first_token_time is None and not seq.output_token_ids:
            seq.first_token_time = now
            self.metrics.ttft.observe(now - seq.arrival_time)
        seq.output_token_ids.append(token)
        hit_stop = update_text(seq, self.tokenizer.decode)
        reason = None
        if hit_stop or token in seq.params.stop_token_ids:
            reason = "stop"
        elif token in self.eos_token_ids and not seq.params.ignore_eos:
            reason = "stop"
        elif len(seq.output_token_ids) >= seq.params.max_tokens:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            seq.finish_time = now
            self.seqs.pop(seq.seq_id, None)
            if len(seq.output_token_ids) > 1:
                self.metrics.tpot.observe((now - seq.first_token_time) / (len(seq.output_token_ids) - 1))
        return RequestOutput(
            request_id=seq.seq_id,
            prompt_token_ids=seq.prompt_token_ids,
            outputs=[CompletionOutput(seq.text, list(seq.output_token_ids), seq.finish_reason)],
            finished=seq.is_finished,
            delta=take_delta(seq),
        )

    # ------------------------------------------------------------------ numbers
    def stored_and_full_tokens(self) -> tuple[int, int]:
        """KV entries stored for running sequences, and what an uncompressed cache would hold."""
        running = self.scheduler.running
        stored = sum(self.blocks.stored_tokens(s.seq_id) for s in running)
        per_token = self.config.num_layers * self.config.num_kv_heads
        return stored, sum(s.num_computed for s in running) * per_token

    def refresh_gauges(self) -> None:
        """Set the metrics that describe the engine's state now; the server calls this when
        /metrics is read, so steps never pay for it."""
        m = self.metrics
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.blocks_used.set(self.blocks.blocks_in_use())
        m.blocks_free.set(self.blocks.num_free_blocks)
        m.preemptions.set(self.scheduler.num_preemptions)
        stored, full = self.stored_and_full_tokens()
        m.kv_ratio.set(stored / full if full else 0.0)

    def _record(self, chunks: list[ScheduledChunk], new_tokens: int, seconds: float) -> None:
        m = self.metrics
        prompt_tokens = sum(
            min(c.end, c.seq.num_prompt_tokens) - c.start
            for c in chunks
            if c.start < c.seq.num_prompt_tokens and not c.repeats
        )
        m.prompt_tokens.inc(prompt_tokens)
        m.generation_tokens.inc(new_tokens)
        m.tokens_per_second.set(sum(c.num_tokens for c in chunks) / max(seconds, 1e-9))
        self.peak_running = max(self.peak_running, len(self.scheduler.running))
        self.peak_stored_bytes = max(self.peak_stored_bytes, self.blocks.blocks_in_use() * self.blocks.block_nbytes)
