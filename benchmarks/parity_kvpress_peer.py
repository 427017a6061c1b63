"""kvpress's side of benchmarks/parity_kvpress.py, run inside kvpress's own venv.

It imports only torch, numpy, transformers and kvpress (kvsqueeze needs a newer
transformers than kvpress 0.5.5 accepts), reads a job written by parity_kvpress.py
and writes, for every prompt and press, which tokens each layer's kv heads kept and
the teacher-forced log-probability of the answer under the compressed cache.

    /tmp/kvpress-venv/bin/python benchmarks/parity_kvpress_peer.py JOB.json OUT.npz

Job: {"model_dir": str, "samples": [{"prompt": [ids], "target": [ids]}],
      "methods": [{"name": str, "press": str, "compression_ratio": float, ...}]}
Out: "kept/<sample>/<name>" -> bool [layers, kv_heads, prompt tokens],
     "logprobs/<sample>/<name>" -> float64 [target tokens].
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from kvpress import (
    AdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as transformers_logging

# Keys are matched back to their prompt positions by an exact integer hash of their
# bits: a compressed cache holds copies (gathers) of the prompt's keys.
_HASH_SEED = 1234


def make_press(method: dict):
    """kvpress's press for one method of the job (None: the full cache)."""
    kind, ratio = method["press"], method.get("compression_ratio", 0.0)
    if kind == "full":
        return None
    if kind == "knorm":
        return KnormPress(compression_ratio=ratio)
    if kind == "streamingllm":
        return StreamingLLMPress(compression_ratio=ratio, n_sink=method["n_sink"])
    if kind == "snapkv":
        return SnapKVPress(compression_ratio=ratio, window_size=method["window"], kernel_size=method["kernel"])
    if kind == "tova":
        return TOVAPress(compression_ratio=ratio)
    if kind == "observed_attention":
        return ObservedAttentionPress(compression_ratio=ratio)
    if kind == "pyramidkv":
        return PyramidKVPress(
            compression_ratio=ratio, window_size=method["window"], kernel_size=method["kernel"], beta=method["beta"]
        )
    if kind == "expected_attention":
        return ExpectedAttentionPress(compression_ratio=ratio, **method.get("options", {}))
    if kind.startswith("adakv-"):
        inner = make_press({**method, "press": kind.removeprefix("adakv-")})
        return AdaKVPress(press=inner, alpha_safeguard=method["alpha"])
    raise ValueError(f"unknown press {kind!r}")


def key_hashes(keys: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """[..., tokens] int64: an exact function of each key's bits (wrapping int64 arithmetic)."""
    bits = keys.contiguous().view(torch.int32).long()
    return (bits * coefficients).sum(dim=-1)


def kept_positions(original: torch.Tensor, kept: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """bool [kv_heads, tokens]: which of `original` [1, h, t, d] keys are in `kept` [1, h, n, d]."""
    full, part = key_hashes(original[0], coefficients), key_hashes(kept[0], coefficients)
    mask = torch.zeros(full.shape, dtype=torch.bool)
    for head in range(full.shape[0]):
        found = torch.isin(full[head], part[head])
        if int(found.sum()) != part.shape[1]:
            raise RuntimeError(f"head {head}: {part.shape[1]} kept keys but {int(found.sum())} matched")
        mask[head] = found
    return mask


def run_method(model, press, prompt: list[int], target: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(kept[layers, kv_heads, tokens], log p(target[i] | prompt, target[:i]))."""
    layers = model.config.num_hidden_layers
    t = len(prompt)
    generator = torch.Generator().manual_seed(_HASH_SEED)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    coefficients = torch.randint(1, 2**62, (head_dim,), generator=generator) | 1
    kept = torch.ones(layers, model.config.num_key_value_heads, t, dtype=torch.bool)
    if press is not None:
        compress = press.compress

        def recording(module, hidden_states, keys, values, attentions, kwargs):
            new_keys, new_values = compress(module, hidden_states, keys, values, attentions, kwargs)
            if new_keys.shape[2] < keys.shape[2]:  # pruned: find which keys survived
                kept[module.layer_idx] = kept_positions(keys, new_keys, coefficients)
            masked = getattr(module, "masked_key_indices", None)
            if masked is not None:  # AdaKV masks per head instead of pruning
                _, heads, positions = masked
                kept[module.layer_idx, heads, positions] = False
            return new_keys, new_values

        press.compress = recording  # an instance attribute: the hook calls self.compress
    cache = DynamicCache()
    with torch.inference_mode(), press(model) if press is not None else nullcontext():
        logits = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    logprobs = []
    with torch.inference_mode():
        # One token at a time, positions given as kvpress's pipeline does: the cache is
        # shorter than the prompt, and PyramidKV's layers differ in length.
        for i, token in enumerate(target):
            logprobs.append(float(torch.log_softmax(logits[0, -1].double(), dim=-1)[token]))
            position = torch.tensor([[t + i]])
            logits = model(torch.tensor([[token]]), past_key_values=cache, position_ids=position).logits
    return kept.numpy(), np.array(logprobs)


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    transformers_logging.disable_progress_bar()  # one line per press is the progress shown
    models = {}

    def model_for(method: dict):
        # Observed attention needs the attention weights, which only eager attention returns.
        impl = "eager" if method["press"] == "observed_attention" else "sdpa"
        if impl not in models:
            models[impl] = AutoModelForCausalLM.from_pretrained(
                job["model_dir"], dtype=torch.float32, attn_implementation=impl
            ).eval()
        return models[impl]

    arrays = {}
    total = len(job["samples"]) * len(job["methods"])
    for s, sample in enumerate(job["samples"]):
        for m, method in enumerate(job["methods"]):
            print(f"kvpress {s * len(job['methods']) + m + 1}/{total}: sample {s} {method['name']}", file=sys.stderr)
            kept, logprobs = run_method(model_for(method), make_press(method), sample["prompt"], sample["target"])
            arrays[f"kept/{s}/{method['name']}"] = kept
            arrays[f"logprobs/{s}/{method['name']}"] = logprobs
    np.savez_compressed(out_path, **arrays)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: parity_kvpress_peer.py JOB.json OUT.npz")
    main(sys.argv[1], sys.argv[2])
