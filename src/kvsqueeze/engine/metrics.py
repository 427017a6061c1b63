"""Prometheus metrics of a serving engine: one registry per server, so tests and
several servers in one process never share counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("kvsqueeze_num_requests_running", "Sequences running", registry=r)
        self.waiting = Gauge("kvsqueeze_num_requests_waiting", "Sequences waiting", registry=r)
        self.blocks_used = Gauge("kvsqueeze_kv_blocks_used", "KV blocks in use", registry=r)
        self.blocks_free = Gauge("kvsqueeze_kv_blocks_free", "KV blocks free", registry=r)
        self.kv_ratio = Gauge(
            "kvsqueeze_kv_stored_over_full",
            "Stored KV tokens over an uncompressed cache's, running sequences",
            registry=r,
        )
        self.preemptions = Gauge("kvsqueeze_preemptions_total", "Sequences preempted (recomputed)", registry=r)
        self.prompt_tokens = Counter("kvsqueeze_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("kvsqueeze_generation_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Gauge(
            "kvsqueeze_tokens_per_second", "Tokens per second over the last step", registry=r
        )
        self.ttft = Histogram("kvsqueeze_time_to_first_token_seconds", "TTFT", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(
            "kvsqueeze_time_per_output_token_seconds", "Time per output token", buckets=_LATENCY_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
