"""The distillation curve as a PNG: training loss and held-out perplexity against
training tokens, with the teacher's perplexity as the line to reach."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curve(curve: list[dict], teacher_ppl: float, path: Path, title: str) -> Path:
    """Loss (left) and held-out perplexity (right) vs tokens, written to `path`."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [p for p in curve if "loss" in p]
    left.plot([p["tokens"] for p in steps], [p["loss"] for p in steps], lw=0.8)
    left.set(xlabel="training tokens", ylabel="KL loss (x T^2)", title="distillation loss")
    evals = [p for p in curve if "held_out_ppl" in p]
    right.plot([p["tokens"] for p in evals], [p["held_out_ppl"] for p in evals], "o-", label="SwiftKV student")
    right.axhline(teacher_ppl, color="k", ls="--", label=f"original model ({teacher_ppl:.2f})")
    right.set(xlabel="training tokens", ylabel="perplexity", title="held-out perplexity")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
