"""Scheduler: continuous batching with chunked prefill, admission by the real
(compressed) KV footprint, and preemption by recompute when the pool runs out.

Every step runs the running sequences first (one token each in decode, the next
chunk of a prompt otherwise), oldest first, then admits waiting sequences while the
step's token budget and the pool allow. The budget is for prompt tokens: decode rows
ride along outside it (max_num_seqs bounds them), so a prompt that fits the budget
runs as one chunk, attending over itself, instead of being cut where the decodes of
the step end (a second chunk must attend over a gather of everything stored). A prompt's last chunk ends exactly at the
prompt, so its policy compresses the whole prompt at once, as the HF path does (a
shared prefix's end is a chunk boundary too). A waiting sequence whose prefix is
cached starts after it, on forked blocks; one whose prefix another sequence is
computing waits for it.

A KVzip sequence whose context is prefilled runs its reconstruction rows next, one a
step, before anything else of it (engine/kvzip.py). A row runs whole (it attends over
itself) and writes no block; it takes its tokens from the step's budget, and a row
longer than what is left waits for a step whose budget is untouched, so a step runs
at most an instruction's tokens past the budget.

Admission reserves (footprint.py): a sequence starts only when its peak footprint and
every running sequence's fit in the pool together, so preemption is for estimates
that fall short; `reserve=False` admits on the next chunk alone (vLLM's way, more
sequences at once, more preemptions). When a running sequence cannot grow, cached
prefixes go first (least recently used), then the newest running sequence gives its
blocks back and waits to be recomputed; nothing ever runs out of memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvsqueeze.engine.block_manager import BlockManager
from kvsqueeze.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, starting at seq.num_computed, run this step."""

    seq: Sequence
    num_tokens: int
    repeats: bool = False  # a KVzip reconstruction row, seq.repeat_rows[seq.num_repeated]

    @property
    def start(self) -> int:
        return self.seq.num_computed

    @property
    def end(self) -> int:
        """Where the sequence stands after the chunk (a reconstruction row leaves it where it is)."""
        return self.seq.num_computed + (0 if self.repeats else self.num_tokens)

    @property
    def token_ids(self) -> list[int]:
        if self.repeats:
            return self.seq.repeat_rows[self.seq.num_repeated].ids
        return self.seq.token_ids[self.start : self.end]

    @property
    def ends_prompt(self) -> bool:
        """The chunk completes the prompt: the policy compresses after it."""
        return self.start < self.seq.num_prompt_tokens <= self.end

    @property
    def scored(self) -> bool:
        """The chunk lies in what the policy compresses: its queries feed the scorer."""
        return self.start < self.seq.compress_at and self.seq.policy.compresses

    @property
    def compresses(self) -> bool:
        """The chunk completes what the policy compresses (the prompt, or its shared prefix)."""
        return self.start < self.seq.compress_at <= self.end

    @property
    def last_repeat(self) -> bool:
        """The sequence's last reconstruction row: the policy compresses after it."""
        return self.repeats and self.seq.num_repeated + 1 == len(self.seq.repeat_rows)

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's last token: a new token is sampled after it."""
        return not self.repeats and self.end == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        reserve: bool = True,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.blocks = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.reserve = reserve
        self._peaks: dict[int, tuple[int, int]] = {}  # seq_id -> peak_blocks (before, after compression)

    def _peak(self, seq: Sequence) -> int:
        """Blocks the sequence may still come to hold at once (footprint.py)."""
        if seq.seq_id not in self._peaks:
            self._peaks[seq.seq_id] = self.blocks.peak_blocks(seq)
        before, after = self._peaks[seq.seq_id]
        return after if seq.compressed else before

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (done or aborted) and return its blocks at once."""
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        self.blocks.free(seq.seq_id)
        self._peaks.pop(seq.seq_id, None)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _next_chunk(self, seq: Sequence, budget: int, start: int | None = None) -> int:
        """Tokens of `seq` to run next from `start` (default: what it has computed), within
        `budget`; the ends of a shared prefix and of the prompt are chunk boundaries."""
        start = seq.num_computed if start is None else start
        end = seq.num_tokens
        for boundary in (seq.prefix_len, seq.num_prompt_tokens):
            if start < boundary:
                end = boundary
                break
        return min(end - start, budget)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        self.running.remove(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledChunk]:
        budget, reserved = self.max_num_batched_tokens, 0
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            if seq.reconstructing:
                n = len(seq.repeat_rows[seq.num_repeated].ids)
                if n <= budget or budget == self.max_num_batched_tokens:
                    chunks.append(ScheduledChunk(seq, n, repeats=True))
                    scheduled.add(seq.seq_id)
                    budget = max(0, budget - n)
                continue
            decoding = not seq.in_prefill
            n = 1 if decoding else self._next_chunk(seq, budget)
            if n == 0:
                continue
            need = self.blocks.blocks_for(seq.seq_id, n)
            while need > self.blocks.num_free_blocks - reserved:
                if self.blocks.prefixes.drop_oldest():
                    continue
                victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
                if not victims:
                    break
                self._preempt(victims[-1])
            if need > self.blocks.num_free_blocks - reserved:
                self._preempt(seq)
                continue
            chunks.append(ScheduledChunk(seq, n))
            scheduled.add(seq.seq_id)
            budget -= 0 if decoding else n
            reserved += need
        prefixes = self.blocks.prefixes
        committed = sum(self._peak(s) for s in self.running) if self.reserve else 0
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs or budget <= 0:
                break
            if self.reserve and self.running and committed + self._peak(seq) > self.blocks.num_blocks:
                break
            key = seq.prefix_key if seq.num_computed == 0 else None
            if key in prefixes.pending:
                continue  # another sequence is computing this prefix: reuse it when it is done
            hit = prefixes.get(key) if key is not None else None
            n = self._next_chunk(seq, budget, seq.prefix_len if hit else None)
            need = self.blocks.blocks_for_fork(hit, n) if hit else self.blocks.blocks_for(seq.seq_id, n)
            while need > self.blocks.num_free_blocks - reserved and len(prefixes) > (hit is not None):
                prefixes.drop_oldest()  # `hit` is the newest entry: dropped last, never here
            if need > self.blocks.num_free_blocks - reserved:
                break
            self.waiting.remove(seq)
            if hit:
                self.blocks.fork_prefix(seq.seq_id, hit)
                seq.start_after_prefix()
                prefixes.hits += 1
            elif key is not None:
                prefixes.pending[key] = seq.seq_id
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            committed += self._peak(seq) if self.reserve else 0
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
            reserved += need
        return chunks
