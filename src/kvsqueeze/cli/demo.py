"""The README's first command: a passphrase hidden in ~2,000 tokens of essays,
retrieved with the full cache and with three compressed ones."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from kvsqueeze.cli.progress import policy_progress
from kvsqueeze.data.haystack import build_haystack
from kvsqueeze.hf.generate import generate
from kvsqueeze.hf.models import load_model
from kvsqueeze.policy import make_policy

DEMO_POLICIES = ("full", "streamingllm", "snapkv", "ada-snapkv")


def run_demo(
    model_name: str, context_tokens: int, keep: float, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[dict]:
    console = Console(width=max(120, Console().width))
    policies = [make_policy(name, keep=keep) for name in DEMO_POLICIES]  # bad input fails before any loading
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    hay = build_haystack(tokenizer, context_tokens, depth=0.5)
    rows = []
    for policy in policy_progress(policies, console):
        result = generate(model, tokenizer, policy, hay.context, hay.question, max_new_tokens=24, chat=True)
        rows.append({"policy": policy.name, "correct": hay.answer in result.text, **result.to_json()})

    table = Table(title=f"Needle in {rows[0]['prompt_tokens']} tokens, keep {keep} ({model_name})")
    for col in ("policy", "answer", "right", "KV stored", "of full", "prefill s", "decode tok/s"):
        table.add_column(col)
    for row in rows:
        table.add_row(
            row["policy"],
            row["text"].strip().replace("\n", " ")[:48],
            "yes" if row["correct"] else "no",
            f"{row['kv_bytes_stored'] / 2**20:.1f} MiB",
            f"{row['kv_bytes_stored'] / row['kv_bytes_full']:.0%}",
            f"{row['prefill_seconds']:.2f}",
            f"{row['decode_tokens_per_second']:.1f}",
        )
    console.print(f"passphrase: {hay.answer}")
    console.print(table)
    return rows
