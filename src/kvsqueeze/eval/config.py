"""What one `kvsqueeze eval` run sweeps, checked before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.eval.tasks import get_task
from kvsqueeze.policy import Policy, make_policy


@dataclass(frozen=True)
class EvalConfig:
    model: str
    task: str
    policies: tuple[str, ...]
    out: Path
    keeps: tuple[float, ...] = ()
    tokens: tuple[int, ...] = ()
    lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] = (0.5,)
    samples: int = 1
    seed: int = 0
    question_agnostic: bool = False
    data: Path | None = None
    window: int = 32
    alpha: float = 0.2
    dtype: str = "float32"
    device: str = "cpu"
    threads: int = field(default=0, compare=False)  # torch threads per worker; 0 = torch's default

    def validate(self) -> None:
        task = get_task(self.task)
        if not self.policies:
            raise KVSqueezeError("give at least one policy")
        if bool(self.keeps) == bool(self.tokens):
            raise KVSqueezeError("give budgets with exactly one of --keep or --tokens")
        self.policy_grid()  # unknown policies and out-of-range budgets fail here
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

    def policy_grid(self) -> list[Policy]:
        """The full cache first (every sample's reference row), then each policy at
        each budget."""
        common = {"window": self.window, "alpha": self.alpha, "seed": self.seed}
        grid = [make_policy("full", **common)]
        for name in dict.fromkeys(self.policies):
            if name == "full":
                continue
            grid += [make_policy(name, keep=k, **common) for k in self.keeps]
            grid += [make_policy(name, tokens=t, **common) for t in self.tokens]
        return grid
