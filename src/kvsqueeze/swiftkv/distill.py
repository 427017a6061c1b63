"""SwiftKV distillation (Qiao et al., arXiv 2410.03960, section 3.3): only the new
SingleInputKV projection and its norm train; everything else is frozen, and the
unmodified model is the teacher, matched by KL divergence on temperature-softened
logits. Trains on the Paul Graham essays (kvsqueeze.data.haystack), keeping their
last part out of training to measure held-out perplexity. Resumable: the trainable
weights, the optimizer and the curve are checkpointed in the output folder."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvsqueeze.data.haystack import essay_tokens
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.swiftkv.convert import check_across_group, convert
from kvsqueeze.swiftkv.modeling import SwiftKVLlamaForCausalLM

STATE_FILE = "distill_state.pt"
CURVE_FILE = "curve.json"


@dataclass(frozen=True)
class DistillConfig:
    """What a run trains and how (SwiftKV, arXiv 2410.03960: KL to the original model's
    logits at `temperature`, only the SingleInputKV projection and norm trained).
    Token counts are of training text; `eval_every` tokens, held-out perplexity is
    measured on `eval_tokens` tokens of the held-out part (the last `held_out` of the essays)."""

    kv_layer: int | None = None
    across_group: int = 1
    tokens: int = 100_000
    seq_len: int = 512
    lr: float = 1e-3
    warmup_steps: int = 10
    temperature: float = 2.0
    eval_every: int = 20_000
    eval_tokens: int = 8192
    held_out: float = 0.1
    checkpoint_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "seq_len", "eval_every", "eval_tokens", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise KVSqueezeError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        check_across_group(self.across_group)
        if not 0.0 < self.held_out < 1.0:
            raise KVSqueezeError(f"held-out fraction must be in (0, 1), got {self.held_out}")
        if not (self.lr > 0 and self.temperature > 0):
            raise KVSqueezeError("learning rate and temperature must be positive")

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.seq_len)

    def resumable_with(self, saved: dict) -> bool:
        """A saved run continues under this config when everything but its length matches."""
        mine = {k: v for k, v in asdict(self).items() if k != "tokens"}
        return mine == {k: v for k, v in saved.items() if k != "tokens"}


@dataclass
class Split:
    """Training and held-out token ids, cut into `seq_len` chunks."""

    train: torch.Tensor  # [n, seq_len]
    held_out: torch.Tensor  # [m, seq_len]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, config: DistillConfig) -> Split:
        ids = torch.tensor(essay_tokens(tokenizer))
        cut = int(len(ids) * (1 - config.held_out))
        train, held = ids[:cut], ids[cut:]
        n, m = len(train) // config.seq_len, min(len(held), config.eval_tokens) // config.seq_len
        if n < 1 or m < 1:
            raise KVSqueezeError(f"the essays ({len(ids)} tokens) are too short for sequences of {config.seq_len}")
        return cls(train[: n * config.seq_len].view(n, -1), held[: m * config.seq_len].view(m, -1))

    def batch(self, step: int, seed: int) -> torch.Tensor:
        """The training sequence of `step` [1, seq_len]: a seeded shuffle, reshuffled each epoch."""
        epoch, i = divmod(step, len(self.train))
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed + epoch))
        return self.train[order[i]].unsqueeze(0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened by `temperature`, per token, scaled by
    temperature**2 so its gradient does not shrink with the temperature (Hinton et al.)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


@torch.no_grad()
def perplexity(model: PreTrainedModel, sequences: torch.Tensor) -> float:
    """exp(mean next-token NLL) over `sequences` [n, t], every position teacher-forced."""
    total, count = 0.0, 0
    for seq in sequences:
        ids = seq.unsqueeze(0).to(model.device)
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(total / count)


@dataclass
class DistillResult:
    student: SwiftKVLlamaForCausalLM
    curve: list[dict]  # {"tokens", "loss"} per step and {"tokens", "held_out_ppl"} per evaluation
    teacher_ppl: float


StepCallback = Callable[[int, int, float], None]  # (step, steps, loss)


def distill(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: DistillConfig,
    out: Path,
    on_step: StepCallback | None = None,
) -> DistillResult:
    """Train a SwiftKV student of `teacher` into `out` (resuming a run found there) and
    save it there as a model folder (config.json + safetensors + tokenizer)."""
    out.mkdir(parents=True, exist_ok=True)
    teacher.eval().requires_grad_(False)
    student = convert(teacher, kv_layer=config.kv_layer, across_group=config.across_group)
    if student.model.swiftkv is None:
        raise KVSqueezeError("kv-layer equals the number of layers: SwiftKV has nothing to train")
    student.requires_grad_(False)
    trainable = list(student.model.swiftkv.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps))
    split = Split.of(tokenizer, config)
    step, curve, teacher_ppl = 0, [], None
    state_path = out / STATE_FILE
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        if not config.resumable_with(state["config"]):
            raise KVSqueezeError(f"{out} holds a run with other settings ({state['config']}); use another --out")
        student.model.swiftkv.load_state_dict(state["swiftkv"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, curve, teacher_ppl = state["step"], state["curve"], state["teacher_ppl"]
    if teacher_ppl is None:
        teacher_ppl = perplexity(teacher, split.held_out)
        curve.append({"tokens": 0, "held_out_ppl": perplexity(student, split.held_out)})
    student.train()
    while step < config.steps:
        ids = split.batch(step, config.seed).to(teacher.device)
        with torch.no_grad():
            target = teacher(ids, use_cache=False).logits
        loss = kd_loss(student(ids, use_cache=False).logits, target, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        tokens = step * config.seq_len
        value = float(loss.detach())
        curve.append({"tokens": tokens, "loss": value})
        if on_step is not None:
            on_step(step, config.steps, value)
        if tokens // config.eval_every > (tokens - config.seq_len) // config.eval_every or step == config.steps:
            student.eval()
            curve.append({"tokens": tokens, "held_out_ppl": perplexity(student, split.held_out)})
            student.train()
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_state(state_path, student, optimizer, schedule, step, curve, teacher_ppl, config)
    student.eval()
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / CURVE_FILE).write_text(json.dumps({"teacher_ppl": teacher_ppl, "curve": curve}, indent=1))
    return DistillResult(student, curve, teacher_ppl)


def save_state(path: Path, student, optimizer, schedule, step: int, curve: list, teacher_ppl: float, config) -> None:
    """Write the resumable state through a temporary file: an interruption leaves the last one whole."""
    tmp = path.with_suffix(".tmp")
    state = {
        "swiftkv": student.model.swiftkv.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "step": step,
        "curve": curve,
        "teacher_ppl": teacher_ppl,
        "config": asdict(config),
    }
    torch.save(state, tmp)
    os.replace(tmp, path)
