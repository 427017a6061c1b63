"""The benches' rows as tables on the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kvsqueeze.bench.engine import EngineBenchRow
from kvsqueeze.bench.runner import BenchRow


def bench_table(rows: list[BenchRow], title: str) -> None:
    table = Table(title=title)
    columns = ("policy", "prefill s", "decode ms/step", "tok/s", "peak MiB", "KV MiB", "KV full MiB", "bound ms")
    for col in (*columns, "x bound"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.policy,
            f"{r.prefill_seconds:.3f}",
            f"{r.decode_ms_per_step:.2f}",
            f"{r.decode_tokens_per_second:.1f}",
            f"{r.peak_memory_bytes / 2**20:.0f}",
            f"{r.kv_bytes_stored / 2**20:.1f}",
            f"{r.kv_bytes_full / 2**20:.1f}",
            f"{r.bound_ms_per_step:.2f}",
            f"{r.ratio_to_bound:.2f}",
        )
    Console(width=max(120, Console().width)).print(table)


def engine_bench_table(rows: list[EngineBenchRow], title: str) -> None:
    table = Table(title=title)
    columns = (
        "policy",
        "s",
        "total tok/s",
        "output tok/s",
        "max running",
        "preempted",
        "TTFT s",
        "TPOT ms",
        "KV peak MiB",
    )
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r.policy,
            f"{r.seconds:.1f}",
            f"{r.total_tokens_per_second:.1f}",
            f"{r.output_tokens_per_second:.1f}",
            str(r.max_running),
            str(r.preemptions),
            f"{r.mean_ttft_s:.2f}",
            f"{r.mean_tpot_ms:.1f}",
            f"{r.kv_bytes_stored_peak / 2**20:.1f}",
        )
    Console(width=max(120, Console().width)).print(table)
