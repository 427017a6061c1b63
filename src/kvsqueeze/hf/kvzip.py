"""KVzip's context reconstruction, run by the model (Kim et al., "KVzip: Query-Agnostic
KV Cache Compression with Context Reconstruction", arXiv 2505.23416).

After a prompt is prefilled (a PrefillRecord), the model is fed, over the uncompressed
cache of that prompt, an instruction to repeat the context and then the context itself,
teacher-forced. The queries and keys every layer makes along the way are handed to the
KVzip scorer (policy/score/kvzip.py) in each layer's ScoreInput; the scorer turns them
into per-head scores. Long contexts are reconstructed in chunks of `chunk` tokens, one
forward each over a fresh cache of the prompt's entries, so a forward's
activations and the scorer's softmax span a chunk, not the context (what is kept, each
layer's copy queries and keys, is about the size of the prefill record itself); a
later chunk's instruction names the last tokens before it, as KVzip's code does (the
instruction and the chunking are policy/reconstruction.py's, which the engine shares). The
cost is about one more prefill.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import torch
from transformers import AttentionInterface, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import AttentionMaskInterface

from kvsqueeze.hf.attention import kvsqueeze_attention, kvsqueeze_mask
from kvsqueeze.hf.cache import use_kvsqueeze_attention
from kvsqueeze.hf.prefill import PrefillRecord
from kvsqueeze.hf.prompt import encode_prompt
from kvsqueeze.policy import Policy
from kvsqueeze.policy.reconstruction import (
    CHUNK,
    MARK,
    RepeatRow,
    first_context_token,
    needs_reconstruction,
    repeat_rows,
)
from kvsqueeze.policy.score import ReconstructionChunk

CAPTURE_ATTENTION = "kvsqueeze-kvzip"


def records_by_policy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    record: PrefillRecord,
    context_ids: list[int],
    chat: bool,
    policies: Sequence[Policy],
) -> list[PrefillRecord]:
    """The record each policy compresses: the KVzip policies' carries the context's
    reconstruction (run once, and only when one of them is there), the others' is `record`."""
    if not any(needs_reconstruction(p) for p in policies):
        return [record] * len(policies)
    rebuilt = reconstruct(model, tokenizer, record, context_ids, chat)
    return [rebuilt if needs_reconstruction(p) else record for p in policies]


def _capturing_attention(module, query, key, value, attention_mask, *args, kvzip_capture=None, **kwargs):
    """The kvsqueeze attention, keeping this forward's queries and its own keys per layer."""
    if kvzip_capture is not None:
        kvzip_capture[module.layer_idx] = (query, key[:, :, -query.shape[2] :])
    return kvsqueeze_attention(module, query, key, value, attention_mask, *args, **kwargs)


AttentionInterface.register(CAPTURE_ATTENTION, _capturing_attention)
AttentionMaskInterface.register(CAPTURE_ATTENTION, kvsqueeze_mask)


def context_start(tokenizer: PreTrainedTokenizerBase, context_ids: list[int], chat: bool) -> int:
    """Tokens before the context text in `context_ids` (a chat template's header, a BOS
    token)."""
    header, _ = encode_prompt(tokenizer, MARK, None, chat)
    return first_context_token(header, context_ids)


def repeat_inputs(
    tokenizer: PreTrainedTokenizerBase, context_ids: list[int], chat: bool, chunk: int = CHUNK
) -> list[RepeatRow]:
    """(start, end, input ids) of each reconstruction forward: the repeat instruction in
    the prompt's format (as the question of encode_prompt), then context [start, end)."""

    def instruction_ids(text: str) -> list[int]:
        return encode_prompt(tokenizer, MARK, text, chat)[1]

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    first = context_start(tokenizer, context_ids, chat)
    return repeat_rows(context_ids, first, instruction_ids, decode, chunk)


def reconstruct(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    record: PrefillRecord,
    context_ids: list[int],
    chat: bool,
    chunk: int = CHUNK,
) -> PrefillRecord:
    """`record` (one prompt that starts with `context_ids`) with every layer's
    reconstruction of the context attached, for the KVzip scorer; its `seconds` add
    the reconstruction's to the prefill's."""
    if any(layer is None for layer in record.layers):
        raise ValueError("kvzip needs every layer's own prefill: a SwiftKV AcrossKV model shares layers")
    first = record.layers[0]
    if first.keys.shape[0] != 1:
        raise ValueError(f"kvzip reconstructs one prompt at a time, got a batch of {first.keys.shape[0]}")
    began = time.perf_counter()
    t = first.keys.shape[2]
    if len(context_ids) > t:
        raise ValueError(f"the context ({len(context_ids)} tokens) is longer than the recorded prompt ({t})")
    chunks: list[list[ReconstructionChunk]] = [[] for _ in record.layers]
    with torch.inference_mode(), use_kvsqueeze_attention(model, CAPTURE_ATTENTION):
        for start, end, ids in repeat_inputs(tokenizer, context_ids, chat, chunk):
            # A fresh cache of the prompt's entries per forward (DynamicCache copies them,
            # a small cost beside the forward): a sliding-window model's cache keeps only
            # its window and cannot be cropped back to the prompt after one.
            prompt_cache = DynamicCache(config=model.config)
            for i, layer in enumerate(record.layers):
                prompt_cache.update(layer.keys, layer.values, i)
            captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            model(
                torch.tensor([ids], device=model.device),
                past_key_values=prompt_cache,
                use_cache=True,
                logits_to_keep=1,
                kvzip_capture=captured,
            )
            for i, (queries, keys) in captured.items():
                chunks[i].append(ReconstructionChunk(start, end, queries, keys))
    layers = [dataclasses.replace(x, reconstruction=tuple(c)) for x, c in zip(record.layers, chunks, strict=True)]
    seconds = record.seconds + time.perf_counter() - began
    return dataclasses.replace(record, layers=layers, seconds=seconds, _scores={})
