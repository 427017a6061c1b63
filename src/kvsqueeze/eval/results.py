"""results.jsonl: one row per (sample, policy, budget), appended as they finish, so
an interrupted sweep resumes where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

from kvsqueeze.eval.config import OLD_ROW_SETTINGS, SETTINGS

# A row's identity: its settings, which sample, and which policy and budget.
ROW_FIELDS = (*SETTINGS, "task", "sample", "length", "depth", "policy", "keep", "tokens")
TIMING_FIELDS = ("prefill_seconds",)  # measured, so not expected to repeat exactly


def row_key(row: dict) -> tuple:
    return tuple(row.get(f) for f in ROW_FIELDS)


def read_rows(path: Path) -> list[dict]:
    """Rows already written, each with every setting (a row written before a setting
    was recorded gets the value runs then used); a line cut short by a crash is
    skipped (and redone)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append({**OLD_ROW_SETTINGS, **json.loads(line)})
        except json.JSONDecodeError:
            continue
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cut_short = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with path.open("a", encoding="utf-8") as f:
        if cut_short:  # start after the partial line a crash left, not on it
            f.write("\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
