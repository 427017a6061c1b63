"""What one `kvsqueeze eval` run sweeps, checked before any model is loaded."""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.eval.tasks import get_task
from kvsqueeze.policy import Policy, make_policy
from kvsqueeze.store.quantized_kv import KVQuantConfig

_SETTING = "row_setting"


def setting(default: object = MISSING) -> object:
    """A config field that changes a row's values: every row records it and it is part
    of the row's resume key, so a run with another value adds rows instead of reusing
    these, and reports never average across values. Its default is also the value
    assumed for rows written before the field was recorded, unless OLD_ROW_SETTINGS
    says what earlier runs did instead."""
    return field(default=default, metadata={_SETTING: True})


@dataclass(frozen=True)
class EvalConfig:
    model: str = setting()
    task: str
    policies: tuple[str, ...]
    out: Path
    keeps: tuple[float, ...] = ()
    tokens: tuple[int, ...] = ()
    lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] = (0.5,)
    samples: int = 1
    seed: int = setting(0)
    question_agnostic: bool = setting(False)
    data: Path | None = setting(None)
    window: int = setting(32)
    alpha: float = setting(0.2)
    group_reduce: str = setting("mean")
    # How SnapKV-family scorers pool (None: each scorer's own) and Ada-KV's share pooling.
    pooling: str | None = setting(None)
    kernel: int | None = setting(None)
    ada_pool_kernel: int = setting(7)
    dtype: str = setting("float32")
    # How kept K/V are stored (store/quantized_kv.py): 16 bits = as they are.
    kv_bits: int = setting(16)
    kv_group: int = setting(32)
    kv_residual: int = setting(128)
    kv_key_axis: str = setting("channel")
    device: str = "cpu"
    threads: int = field(default=0, compare=False)  # torch threads per worker; 0 = torch's default

    def settings(self) -> dict:
        """The settings as a row records them (JSON values)."""
        values = {name: getattr(self, name) for name in SETTINGS}
        return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}

    def validate(self) -> None:
        task = get_task(self.task)
        if not self.policies:
            raise KVSqueezeError("give at least one policy")
        if bool(self.keeps) == bool(self.tokens):
            raise KVSqueezeError("give budgets with exactly one of --keep or --tokens")
        self.policy_grid()  # unknown policies and out-of-range budgets fail here
        self.quant()
        if task.needs_lengths and not self.lengths:
            raise KVSqueezeError(f"the {self.task} task needs --lengths")
        if any(n < 1 for n in self.lengths):
            raise KVSqueezeError(f"lengths must be positive token counts, got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise KVSqueezeError(f"depths must be in [0, 1], got {list(self.depths)}")
        if self.samples < 1:
            raise KVSqueezeError(f"samples must be at least 1, got {self.samples}")
        if self.task == "longbench" and self.data is None:
            raise KVSqueezeError("the longbench task needs --data FILE (LongBench-format JSONL)")
        _check_out(self.out)

    def quant(self) -> KVQuantConfig:
        """How every policy's cache stores what it keeps (bad values raise ValueError)."""
        return KVQuantConfig(self.kv_bits, self.kv_group, self.kv_residual, self.kv_key_axis)  # type: ignore[arg-type]

    def policy_grid(self) -> list[Policy]:
        """The full cache first (every sample's reference row), then each policy at
        each budget."""
        common = {
            "window": self.window,
            "alpha": self.alpha,
            "group_reduce": self.group_reduce,
            "seed": self.seed,
            "pooling": self.pooling,
            "kernel": self.kernel,
            "ada_pool_kernel": self.ada_pool_kernel,
        }
        grid = [make_policy("full", **common)]
        for name in dict.fromkeys(self.policies):
            if name == "full":
                continue
            grid += [make_policy(name, keep=k, **common) for k in self.keeps]
            grid += [make_policy(name, tokens=t, **common) for t in self.tokens]
        return grid


SETTINGS: tuple[str, ...] = tuple(f.name for f in fields(EvalConfig) if f.metadata.get(_SETTING))
# What a row without a setting's field (written before it was recorded) was run with: the
# defaults, except where a default changed when the setting was added. Before the pooling
# settings, SnapKV-family scorers max-pooled with kernel 7 and Ada-KV ranked unpooled scores.
DEFAULT_SETTINGS: dict = {
    f.name: f.default for f in fields(EvalConfig) if f.metadata.get(_SETTING) and f.default is not MISSING
}
OLD_ROW_SETTINGS: dict = {
    **DEFAULT_SETTINGS,
    "pooling": "max",
    "kernel": 7,
    "ada_pool_kernel": 1,
}


def _check_out(out: Path) -> None:
    """The results folder must be creatable and writable, so a bad --out fails now
    and not after the first sample has run."""
    if out.exists() and not out.is_dir():
        raise KVSqueezeError(f"--out {str(out)!r} is a file, not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise KVSqueezeError(f"--out {str(out)!r} is inside {str(existing)!r}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KVSqueezeError(f"--out {str(out)!r}: {str(existing)!r} is not writable")
    if (out / "results.jsonl").is_dir():
        raise KVSqueezeError(f"{str(out / 'results.jsonl')!r} is a folder; results.jsonl must be a file")
