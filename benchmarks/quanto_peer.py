"""The peer rows for KV quantization (issue 13): transformers' `QuantizedCache` with the
quanto backend, at 4 and 2 bits, on the samples `kvsqueeze eval` scores (needle
question-aware and -agnostic, perplexity), scored by kvsqueeze's own code.

What is reused from kvsqueeze, not copied: the model loader (`hf.models.load_model`),
the tasks and their samples (`eval.tasks.needle.NeedleTask`, `eval.tasks.ppl.PerplexityTask`,
seeded per sample as in `kvsqueeze eval`), the prompt construction (`eval.prompt.PromptFormat`:
chat template, context / question split), greedy decoding (`hf.decode.greedy`), the
teacher-forced log-probabilities (`eval.answer.token_logprobs`) and the metric
(`eval.metrics.score`). The per-sample protocol is `eval/evaluate.py`'s: question-aware
prefills context + question; question-agnostic prefills the context only and then feeds
the question through the cache; the answer log-prob is taken on a fresh cache.

The cache under test is `transformers.QuantizedCache("quanto", config, nbits=b,
q_group_size=G, residual_length=R)` with transformers' defaults (G=64, R=128,
axis_key=axis_value=0). With axis 0, quanto groups `G` consecutive elements of the
[batch, kv_heads, tokens, head_dim] tensor: at head_dim 64 one group is one token's
vector of one head, for keys and values alike (per-token, not KIVI's per-channel keys).
`--axis-key -1` groups keys per channel over G consecutive (head, token) rows instead
(KIVI's key layout when the token count is a multiple of G; quanto raises otherwise).
On its first update the layer quantizes the whole prefill (the prefill's own attention
uses the exact K/V); later tokens wait in a bf16 residual until it holds R, then the
whole cache is dequantized, concatenated and re-quantized; every decode step attends
over a dequantized copy of the whole cache. Rows at kv_bits 16 use transformers'
`DynamicCache` through the same code: the peer's own unquantized reference.

One forward per sample and mode: the prefill runs once into a `DynamicCache`, and each
cache under test is filled by calling its `update(keys, values, layer)` with that
prefill's K/V, layer by layer: the call the attention layer makes during the forward,
with the same tensors (K/V of a prefill do not depend on the cache class). `--verify`
checks this on the first needle sample: a direct prefill into a QuantizedCache and the
replayed one give the same greedy tokens and next-token logits (max |diff| recorded).

Bytes: the inner tensors (`__tensor_flatten__`) of the quantized K/V (packed codes, scales,
shifts) plus the bf16 residual, summed over layers, measured right after the prefill;
full = prompt tokens x 2 x kv_heads x head_dim x 2 bytes x layers (kvsqueeze's definition).

Needs a venv with optimum-quanto (kept out of the project's): see
docs/results/kv_quantization/README.md, "Peer: transformers QuantizedCache (quanto)".

    PYTHONPATH=src /tmp/quanto-venv/bin/python benchmarks/quanto_peer.py --task needle \\
        --lengths 2048,4096 --depths 0.5 --samples 1 --modes aware,agnostic --verify
    PYTHONPATH=src /tmp/quanto-venv/bin/python benchmarks/quanto_peer.py --task ppl --lengths 2304 --samples 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Cache, DynamicCache, PreTrainedModel, QuantizedCache

from kvsqueeze.eval.answer import token_logprobs
from kvsqueeze.eval.metrics import score
from kvsqueeze.eval.prompt import PromptFormat
from kvsqueeze.eval.sample import Sample
from kvsqueeze.eval.tasks.base import TaskRequest
from kvsqueeze.eval.tasks.needle import NeedleTask
from kvsqueeze.eval.tasks.ppl import PerplexityTask
from kvsqueeze.hf.decode import greedy, stop_ids
from kvsqueeze.hf.models import load_model

# transformers renamed `past_key_values` to `cache`; kvsqueeze's helpers still pass the old name.
warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated", category=FutureWarning)

DEFAULT_OUT = Path("docs/results/kv_quantization/quanto")
MACHINE = f"2-core shared VM ({platform.machine()} Intel Xeon, AVX-512/AMX), CPU only, other engineers' jobs running"
PEER = "transformers-QuantizedCache-quanto"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# A row's identity, for resuming: a rerun skips rows already in results.jsonl.
KEY_FIELDS = (
    "task",
    "length",
    "depth",
    "sample",
    "question_agnostic",
    "kv_bits",
    "kv_group",
    "kv_residual",
    "kv_axis_key",
    "dtype",
)


@dataclass(frozen=True)
class Settings:
    group: int | None  # None: transformers' default q_group_size
    residual: int | None  # None: transformers' default residual_length
    axis_key: int | None  # None: transformers' default axis_key (0: per token); -1: per channel
    dtype: str


@dataclass
class Prefill:
    """One forward over a prompt: its K/V per layer, the next-token logits, its time."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_logits: torch.Tensor
    seconds: float


def prefill(model: PreTrainedModel, ids: list[int]) -> Prefill:
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[:, -1]
    seconds = time.perf_counter() - start
    return Prefill([la.keys for la in cache.layers], [la.values for la in cache.layers], logits, seconds)


def make_cache(model: PreTrainedModel, bits: int, settings: Settings) -> Cache:
    """An empty cache: DynamicCache at 16 bits, else QuantizedCache (quanto) with
    transformers' defaults for any setting left None."""
    if bits == 16:
        return DynamicCache(config=model.config)
    kwargs = {"q_group_size": settings.group, "residual_length": settings.residual, "axis_key": settings.axis_key}
    return QuantizedCache("quanto", model.config, nbits=bits, **{k: v for k, v in kwargs.items() if v is not None})


def filled(model: PreTrainedModel, bits: int, settings: Settings, record: Prefill) -> tuple[Cache, float]:
    """A cache holding the recorded prefill, filled by the update() calls the forward
    makes (the quantized layers quantize the whole prefill here), and the seconds it took."""
    cache = make_cache(model, bits, settings)
    start = time.perf_counter()
    for layer, (keys, values) in enumerate(zip(record.keys, record.values, strict=True)):
        cache.update(keys, values, layer)
    return cache, time.perf_counter() - start


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's storage; for a quanto tensor, of its inner tensors (codes, scale, shift)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def cache_bytes(cache: Cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            t = getattr(layer, name, None)
            if t is not None:
                total += tensor_bytes(t)
    return total


def full_bytes(model: PreTrainedModel, tokens: int) -> int:
    """What a bf16 cache of `tokens` tokens holds (kvsqueeze's `full_nbytes`)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return tokens * 2 * config.num_key_value_heads * head_dim * 2 * config.num_hidden_layers


def cache_layout(cache: Cache) -> dict:
    """What the first layer holds: quantized tokens, residual tokens, the quanto tensor type."""
    layer = cache.layers[0]
    quantized = getattr(layer, "_quantized_keys", None)
    residual = layer.keys.shape[-2] if layer.keys.dim() == 4 else 0
    return {
        "quantized_tokens": int(quantized.shape[-2]) if quantized is not None else 0,
        "residual_tokens": int(residual),
        "quantized_type": type(quantized).__name__ if quantized is not None else None,
    }


def base_row(sample: Sample, bits: int, settings: Settings, question_agnostic: bool, cache: Cache) -> dict:
    quantized = bits != 16
    layer = cache.layers[0]
    return {
        "model": "smollm2-135m",
        "seed": 0,
        "peer": PEER if quantized else "transformers-DynamicCache",
        "task": sample.task,
        "length": sample.length,
        "depth": sample.depth,
        "sample": sample.index,
        "question_agnostic": question_agnostic,
        "dtype": settings.dtype,
        "kv_bits": bits,
        "kv_group": layer.q_group_size if quantized else None,
        "kv_residual": layer.residual_length if quantized else None,
        "kv_axis_key": layer.axis_key if quantized else None,
        "kv_axis_value": layer.axis_value if quantized else None,
        "policy": "full",
        "keep": 1.0,
    }


def needle_rows(
    model: PreTrainedModel, fmt: PromptFormat, sample: Sample, question_agnostic: bool, bits: list[int], s: Settings
) -> list[dict]:
    """eval/evaluate.py's needle protocol, with a transformers cache in place of kvsqueeze's."""
    context_ids, question_ids = fmt.encode(sample.context, sample.question, sample.answer_prefix)
    target_ids = fmt.tokens(sample.target)
    record = prefill(model, context_ids if question_agnostic else context_ids + question_ids)
    stop = stop_ids(model)

    def ends_answer(tokens: list[int]) -> bool:
        return sample.single_line and "\n" in fmt.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()

    rows = []
    for b in bits:
        cache, fill_seconds = filled(model, b, s, record)
        stored, layout = cache_bytes(cache), cache_layout(cache)
        start = time.perf_counter()
        logits = record.last_logits
        if question_agnostic:  # the question reaches the quantized cache through its residual
            logits = model(torch.tensor([question_ids]), past_key_values=cache, use_cache=True).logits[:, -1]
        answer = greedy(model, cache, logits, sample.max_new_tokens, stop, ends_answer)
        decode_seconds = time.perf_counter() - start
        prediction = fmt.tokenizer.decode(answer, skip_special_tokens=True)
        fresh, _ = filled(model, b, s, record)
        ids = (question_ids if question_agnostic else []) + target_ids
        logprobs = token_logprobs(model, fresh, record.last_logits, ids)[-len(target_ids) :]
        rows.append(
            {
                **base_row(sample, b, s, question_agnostic, cache),
                "score": score(sample.metric, prediction, sample.answers, sample.all_classes),
                "answer_logprob": round(float(logprobs.mean()), 4),
                "prediction": prediction,
                "prompt_tokens": len(context_ids) + len(question_ids),
                "kv_bytes_stored": stored,
                "kv_bytes_full": full_bytes(model, record.keys[0].shape[-2]),
                **layout,
                "prefill_seconds": round(record.seconds, 4),
                "quantize_seconds": round(fill_seconds, 4),
                "decode_seconds": round(decode_seconds, 4),
                "new_tokens": len(answer),
            }
        )
    return rows


def ppl_rows(model: PreTrainedModel, fmt: PromptFormat, sample: Sample, bits: list[int], s: Settings) -> list[dict]:
    """eval/evaluate.py's perplexity protocol: the continuation teacher-forced in one chunk."""
    context_ids, continuation_ids = fmt.tokens(sample.context), fmt.tokens(sample.continuation)
    record = prefill(model, context_ids)
    rows = []
    for b in bits:
        cache, fill_seconds = filled(model, b, s, record)
        stored, layout = cache_bytes(cache), cache_layout(cache)
        start = time.perf_counter()
        nll = -float(token_logprobs(model, cache, record.last_logits, continuation_ids).mean())
        rows.append(
            {
                **base_row(sample, b, s, False, cache),
                "score": round(math.exp(nll), 4),
                "answer_logprob": round(-nll, 4),
                "prediction": "",
                "prompt_tokens": len(context_ids) + len(continuation_ids),
                "kv_bytes_stored": stored,
                "kv_bytes_full": full_bytes(model, len(context_ids)),
                **layout,
                "prefill_seconds": round(record.seconds, 4),
                "quantize_seconds": round(fill_seconds, 4),
                "decode_seconds": round(time.perf_counter() - start, 4),
            }
        )
    return rows


def verify_replay(model: PreTrainedModel, fmt: PromptFormat, sample: Sample, bits: int, s: Settings) -> dict:
    """A QuantizedCache filled during the forward vs one filled from the recorded K/V:
    the same greedy tokens, and their next-token logits' largest difference."""
    context_ids, question_ids = fmt.encode(sample.context, sample.question, sample.answer_prefix)
    ids = context_ids + question_ids
    record = prefill(model, ids)
    direct = make_cache(model, bits, s)
    direct_logits = model(torch.tensor([ids]), past_key_values=direct, use_cache=True).logits[:, -1]
    replayed, _ = filled(model, bits, s, record)
    steps, diffs, tokens = 4, [float((direct_logits.float() - record.last_logits.float()).abs().max())], []
    a, b = direct_logits, record.last_logits
    for _ in range(steps):
        ta, tb = int(a.argmax()), int(b.argmax())
        tokens.append((ta, tb))
        a = model(torch.tensor([[ta]]), past_key_values=direct, use_cache=True).logits[:, -1]
        b = model(torch.tensor([[tb]]), past_key_values=replayed, use_cache=True).logits[:, -1]
        diffs.append(float((a.float() - b.float()).abs().max()))
    return {
        "verify_replay": True,
        "kv_bits": bits,
        "length": sample.length,
        "same_tokens": all(x == y for x, y in tokens),
        "tokens": tokens,
        "max_abs_logit_diff": max(diffs),
    }


def roundtrip(model: PreTrainedModel, fmt: PromptFormat, sample: Sample, group: int) -> list[dict]:
    """Relative round-trip error (sum of squared errors / sum of squares over every layer)
    of quanto's quantizer and of kvsqueeze's own min-max quantizer applied with the same
    grouping (per token, `group` channels), on the K/V of one real prefill."""
    from optimum.quanto import MaxOptimizer, qint2, qint4, quantize_weight

    from kvsqueeze.store.quantize import quantize_along

    record = prefill(model, fmt.tokens(sample.context))
    rows = []
    for bits, qtype in ((4, qint4), (2, qint2)):
        for kind, tensors in (("keys", record.keys), ("values", record.values)):
            err_quanto = err_kvsqueeze = total = 0.0
            for x in tensors:
                scale, shift = MaxOptimizer()(x, qtype, 0, group)
                via_quanto = quantize_weight(x, qtype, 0, scale, shift, group).dequantize().float()
                xf = x.float()
                codes, s, z = quantize_along(xf.unflatten(-1, (-1, group)), bits, dim=-1)
                via_kvsqueeze = (codes.float() * s.float() + z.float()).flatten(-2)
                err_quanto += float((via_quanto - xf).pow(2).sum())
                err_kvsqueeze += float((via_kvsqueeze - xf).pow(2).sum())
                total += float(xf.pow(2).sum())
            rows.append(
                {
                    "roundtrip": True,
                    "kv_bits": bits,
                    "kind": kind,
                    "group": group,
                    "tokens": record.keys[0].shape[-2],
                    "relative_sq_error_quanto": round(err_quanto / total, 5),
                    "relative_sq_error_kvsqueeze_quantize_along": round(err_kvsqueeze / total, 5),
                }
            )
    return rows


def key(row: dict) -> tuple:
    return tuple(row.get(f) for f in KEY_FIELDS)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def append(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def units(args: argparse.Namespace, fmt: PromptFormat) -> Iterator[tuple[Sample, bool]]:
    """(sample, question_agnostic) in the order they run."""
    lengths = tuple(int(n) for n in args.lengths.split(","))
    if args.task == "ppl":
        request = TaskRequest(lengths=lengths, depths=(0.5,), samples=args.samples, seed=args.seed)
        for sample in PerplexityTask().samples(fmt, request):
            yield sample, False
        return
    depths = tuple(float(d) for d in args.depths.split(","))
    modes = [m.strip() for m in args.modes.split(",")]
    request = TaskRequest(lengths=lengths, depths=depths, samples=args.samples, seed=args.seed)
    samples = list(NeedleTask().samples(fmt, request))
    for mode in modes:
        for sample in samples:
            yield sample, mode == "agnostic"


def versions() -> str:
    return ", ".join(f"{name} {metadata.version(name)}" for name in ("torch", "transformers", "optimum-quanto"))


def axis(row: dict) -> str:
    """The key axis in words: 0 groups channels of one token, -1 tokens of one channel."""
    return {None: "—", 0: "0 (per token)", -1: "-1 (per channel)"}[row.get("kv_axis_key")]


def summary(rows: list[dict], path: Path, machine: str) -> None:
    """summary.md: one table per task, every row as measured (no averaging across settings)."""
    rows = [r for r in rows if not r.get("verify_replay")]
    checks = [r for r in read_rows(path.parent / "verify.jsonl")]
    lines = [
        "# transformers QuantizedCache (quanto) on kvsqueeze's samples — measured",
        "",
        f"Written by `benchmarks/quanto_peer.py` from `results.jsonl` ({len(rows)} rows). Machine: {machine}; "
        f"{versions()}. Timings are wall seconds on a shared machine: not comparable across rows.",
        "Model SmolLM2-135M-Instruct, policy full (keep 1.0): every token kept, only the storage differs.",
        "kv_bits 16 = transformers `DynamicCache` (bf16) through the same code; 4 / 2 = `QuantizedCache`",
        "(backend quanto, axis_value = 0; transformers' defaults G=64, R=128, axis_key=0 unless a row says",
        "otherwise).",
        "Bytes: the cache's own tensors right after the prefill / a bf16 cache of the prompt.",
        "",
    ]
    needle = [r for r in rows if r["task"] == "needle"]
    if needle:
        lines += [
            "## needle",
            "",
            "| length | depth | sample | mode | kv_bits | G | R | key axis | score | answer log-prob | prediction | "
            "KV stored / full | prefill s | decode s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = sorted(
            needle, key=lambda r: (r["question_agnostic"], r["length"], r["depth"], r["sample"], -r["kv_bits"])
        )
        for r in order:
            mode = "agnostic" if r["question_agnostic"] else "aware"
            lines.append(
                f"| {r['length']} | {r['depth']} | {r['sample']} | {mode} | {r['kv_bits']} | {r['kv_group'] or '—'} | "
                f"{r['kv_residual'] or '—'} | {axis(r)} | {r['score']:.3f} | {r['answer_logprob']:.4f} | "
                f"`{r['prediction']!r}` | "
                f"{r['kv_bytes_stored'] / r['kv_bytes_full']:.4f} | {r['prefill_seconds']:.1f} | "
                f"{r['decode_seconds']:.1f} |"
            )
        lines.append("")
    ppl = [r for r in rows if r["task"] == "ppl"]
    if ppl:
        lines += [
            "## perplexity (context = length - 256 tokens, 256-token continuation teacher-forced in one chunk)",
            "",
            "| length | kv_bits | G | R | key axis | per sample | mean | vs 16-bit | KV stored / full |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        by_setting: dict[tuple, list[dict]] = {}
        for r in ppl:
            by_setting.setdefault((r["length"], r["kv_bits"], r["kv_group"], r["kv_residual"], axis(r)), []).append(r)
        for (length, bits, group, residual, key_axis), rs in sorted(
            by_setting.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][4])
        ):
            rs = sorted(rs, key=lambda r: r["sample"])
            m = sum(r["score"] for r in rs) / len(rs)
            base = by_setting.get((length, 16, None, None, "—"), [])
            rel = "" if bits == 16 or not base else f"{m / (sum(r['score'] for r in base) / len(base)) - 1:+.1%}"
            per = " / ".join(f"{r['score']:.3f}" for r in rs)
            stored = sum(r["kv_bytes_stored"] / r["kv_bytes_full"] for r in rs) / len(rs)
            lines.append(
                f"| {length} | {bits} | {group or '—'} | {residual or '—'} | {key_axis} | {per} | {m:.3f} | {rel} | "
                f"{stored:.4f} |"
            )
        lines.append("")
    trips = read_rows(path.parent / "roundtrip.jsonl")
    if trips:
        lines += [
            "## quantizer round trip (`--roundtrip`): relative squared error on one prefill's K/V, all layers",
            "",
            "quanto's `quantize_weight` (MaxOptimizer, axis 0) against kvsqueeze's `quantize_along` "
            "(store/quantize.py) given the same groups (per token, G channels):",
            "",
            "| bits | K/V | G | tokens | quanto | kvsqueeze quantize_along |",
            "|---|---|---|---|---|---|",
        ]
        for t in trips:
            lines.append(
                f"| {t['kv_bits']} | {t['kind']} | {t['group']} | {t['tokens']} | {t['relative_sq_error_quanto']} | "
                f"{t['relative_sq_error_kvsqueeze_quantize_along']} |"
            )
        lines.append("")
    if checks:
        lines += ["## replay check (`--verify`)", ""]
        for c in checks:
            lines.append(
                f"- {c['length']} tokens, {c['kv_bits']} bits: same greedy tokens {c['same_tokens']}, "
                f"max |logit diff| over prefill + {len(c['tokens'])} steps {c['max_abs_logit_diff']:.3g}"
            )
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("needle", "ppl"), default="needle")
    parser.add_argument("--lengths", default="2048", help="prompt lengths (ppl: context + 256 continuation)")
    parser.add_argument("--depths", default="0.5")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="aware,agnostic", help="needle: aware, agnostic or both")
    parser.add_argument("--bits", default="16,4,2", help="16 = DynamicCache; 4, 2 = QuantizedCache(quanto)")
    parser.add_argument("--group", type=int, default=None, help="q_group_size (default: transformers', 64)")
    parser.add_argument("--residual", type=int, default=None, help="residual_length (default: transformers', 128)")
    parser.add_argument(
        "--axis-key",
        type=int,
        choices=(0, -1),
        default=None,
        help="quanto key axis (default: transformers', 0 = per token; -1 = per channel, groups of G tokens)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--verify", action="store_true", help="check the replayed prefill on the first needle sample")
    parser.add_argument("--roundtrip", action="store_true", help="quantizer round-trip error on the first sample's K/V")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--machine", default=MACHINE)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    settings = Settings(group=args.group, residual=args.residual, axis_key=args.axis_key, dtype=args.dtype)
    bits = [int(b) for b in args.bits.split(",")]
    results = args.out / "results.jsonl"
    done = {key(r) for r in read_rows(results)}
    model, tokenizer = load_model("smollm2-135m", dtype=DTYPES[args.dtype], device="cpu")
    model.set_attn_implementation("sdpa")
    fmt = PromptFormat(tokenizer)
    defaults = QuantizedCache("quanto", model.config).layers[0]
    group = settings.group or defaults.q_group_size
    residual = settings.residual or defaults.residual_length
    axis_key = defaults.axis_key if settings.axis_key is None else settings.axis_key

    def todo(sample: Sample, agnostic: bool) -> list[int]:
        def row_key(b: int) -> tuple:
            row = {
                "task": sample.task,
                "length": sample.length,
                "depth": sample.depth,
                "sample": sample.index,
                "question_agnostic": agnostic,
                "kv_bits": b,
                "kv_group": None if b == 16 else group,
                "kv_residual": None if b == 16 else residual,
                "kv_axis_key": None if b == 16 else axis_key,
                "dtype": args.dtype,
            }
            return key(row)

        return [b for b in bits if row_key(b) not in done]

    work = [(sample, agnostic, todo(sample, agnostic)) for sample, agnostic in units(args, fmt)]
    work = [w for w in work if w[2]]
    with torch.inference_mode():
        if args.verify and args.task == "needle" and work:
            for b in (b for b in bits if b != 16):
                append(args.out / "verify.jsonl", [verify_replay(model, fmt, work[0][0], b, settings)])
        if args.roundtrip:
            first = next(units(args, fmt))[0]
            append(args.out / "roundtrip.jsonl", roundtrip(model, fmt, first, group))
        for sample, agnostic, missing in tqdm(work, desc=f"quanto peer {args.task}", unit="prompt"):
            if args.task == "ppl":
                rows = ppl_rows(model, fmt, sample, missing, settings)
            else:
                rows = needle_rows(model, fmt, sample, agnostic, missing, settings)
            append(results, rows)
            for r in rows:
                tqdm.write(
                    f"{r['task']} {r['length']} d={r['depth']} agnostic={r['question_agnostic']} "
                    f"bits={r['kv_bits']}: score {r['score']} logprob {r['answer_logprob']} {r['prediction']!r} "
                    f"bytes {r['kv_bytes_stored'] / r['kv_bytes_full']:.4f}"
                )
    summary(read_rows(results), args.out / "summary.md", args.machine)


if __name__ == "__main__":
    main()
