"""`kvsqueeze bench-engine`: offline throughput of the serving engine, per policy, on
the workload of shared/bench/anchor_vllm_cpu.py (vLLM's CPU build), so the two can be
run side by side: N prompts of exactly L tokens cut from the Paul Graham essays at
token offsets 7*i, M tokens each, greedy, ignore_eos, a fixed KV memory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kvsqueeze.data.haystack import essay_files
from kvsqueeze.engine.llm_engine import EngineArgs, LLMEngine, parse_bytes
from kvsqueeze.engine.sampling_params import SamplingParams
from kvsqueeze.engine.tokenizer import Tokenizer
from kvsqueeze.errors import KVSqueezeError


@dataclass
class EngineBenchRow:
    policy: str
    seconds: float
    total_tokens_per_second: float
    output_tokens_per_second: float
    max_running: int  # peak concurrent sequences
    preemptions: int
    mean_ttft_s: float
    mean_tpot_ms: float
    kv_memory_bytes: int
    kv_bytes_stored_peak: int
    kv_bits: int = 16

    def as_dict(self) -> dict:
        return asdict(self)


def essays_file_text() -> str:
    """The essays concatenated byte for byte, as `cat PaulGrahamEssays/*.txt` gives them
    (the anchor script's input)."""
    return "".join(f.read_text(encoding="utf-8") for f in essay_files())


def essay_prompts(tokenizer: Tokenizer, num_prompts: int, prompt_len: int) -> list[list[int]]:
    ids = tokenizer.encode(essays_file_text(), add_special_tokens=False)
    if len(ids) < prompt_len + 7 * num_prompts:
        raise KVSqueezeError(f"the essays hold {len(ids)} tokens: too few for {num_prompts} x {prompt_len}")
    return [ids[7 * i : 7 * i + prompt_len] for i in range(num_prompts)]


def bench_engine(
    model_dir: str | Path,
    policies: list[str],
    keep: float | None,
    tokens: int | None,
    num_prompts: int,
    prompt_len: int,
    output_len: int,
    kv_memory: str | int = "1GiB",
    dtype: str = "bf16",
    device: str = "cpu",
    window: int = 32,
    on_policy: Callable[[str], None] | None = None,
    compress_chunks: bool = False,
    reserve: bool = True,
    kv_bits: int = 16,
    kv_group: int = 32,
    kv_residual: int = 128,
) -> list[EngineBenchRow]:
    """One timed run of the whole workload per policy, each on a fresh engine after a
    short warm-up request (`compress_chunks`: compress each prompt chunk as it runs;
    `reserve`: admit by peak footprint, engine/footprint.py; `kv_bits` < 16: KIVI-quantized
    pages, engine/block_manager.py)."""
    rows = []
    for policy in policies:
        if on_policy is not None:
            on_policy(policy)
        args = EngineArgs(
            model=str(model_dir), policy=policy, keep=keep, tokens=tokens, window=window,
            kv_memory=kv_memory, dtype=dtype, device=device, compress_chunks=compress_chunks,
            reserve=reserve, kv_bits=kv_bits, kv_group=kv_group, kv_residual=kv_residual,
        )  # fmt: skip
        engine = LLMEngine(args)
        prompts = essay_prompts(engine.tokenizer, num_prompts, prompt_len)
        _run(engine, [prompts[0][:64]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        engine.peak_running = engine.peak_stored_bytes = engine.scheduler.num_preemptions = 0
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        start = time.perf_counter()
        seqs = _run(engine, prompts, params)
        seconds = time.perf_counter() - start
        generated = sum(len(s.output_token_ids) for s in seqs)
        ttft = [s.first_token_time - s.arrival_time for s in seqs]
        tpot = [
            (s.finish_time - s.first_token_time) / (len(s.output_token_ids) - 1)
            for s in seqs
            if len(s.output_token_ids) > 1
        ]
        rows.append(
            EngineBenchRow(
                policy=policy,
                seconds=round(seconds, 2),
                total_tokens_per_second=round((generated + num_prompts * prompt_len) / seconds, 1),
                output_tokens_per_second=round(generated / seconds, 1),
                max_running=engine.peak_running,
                preemptions=engine.scheduler.num_preemptions,
                mean_ttft_s=round(sum(ttft) / len(ttft), 3),
                mean_tpot_ms=round(1000 * sum(tpot) / len(tpot), 2) if tpot else 0.0,
                kv_memory_bytes=parse_bytes(kv_memory),
                kv_bytes_stored_peak=engine.peak_stored_bytes,
                kv_bits=kv_bits,
            )
        )
    return rows


def _run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list:
    seqs = [engine.add_request(p, params) for p in prompts]
    for s in seqs:  # all arrive now: time to first token counts the wait for admission
        s.arrival_time = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return seqs
