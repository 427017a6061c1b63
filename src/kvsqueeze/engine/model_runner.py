"""ModelRunner: load a Hugging Face Llama-family folder and run flat batches through it."""

from __future__ import annotations

from pathlib import Path

import torch

from kvsqueeze.engine.attention_batch import AttentionBackend, AttentionBatch
from kvsqueeze.engine.dense_backend import DenseBackend
from kvsqueeze.engine.model import LlamaModel, ModelConfig
from kvsqueeze.engine.tokenizer import Tokenizer
from kvsqueeze.engine.weights import load_config, load_weights
from kvsqueeze.errors import KVSqueezeError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise KVSqueezeError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in. On a CPU without bf16/fp16 matmul instructions (AVX512-BF16,
    AMX) torch runs them about 4x slower than fp32 (measured on an AVX2 EPYC: benchmarks/
    engine_forward.py), so there a 16-bit checkpoint computes in fp32 and stores its KV in 16 bits."""
    if device.type != "cpu" or dtype == torch.float32:
        return dtype
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        native = cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported()
    else:
        native = cpu._is_amx_fp16_supported()
    return dtype if native else torch.float32


class ModelRunner:
    """Config, weights, tokenizer and an attention backend; `run(batch)` gives last-token logits.

    `dtype` is the checkpoint's working precision (and the dense backend's KV dtype);
    `compute_dtype` what the matmuls run in (by default fp32 on CPUs without bf16 hardware).
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        backend: AttentionBackend | None = None,
        compute_dtype: torch.dtype | str | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.compute_dtype = (
            resolve_dtype(compute_dtype) if compute_dtype else default_compute_dtype(self.dtype, self.device)
        )
        self.config = ModelConfig.from_dict(load_config(self.model_dir))
        self.model = LlamaModel(self.config, load_weights(self.model_dir), self.compute_dtype, self.device)
        has_tokenizer = (self.model_dir / "tokenizer.json").exists()
        self.tokenizer = Tokenizer(self.model_dir) if has_tokenizer else None
        self.backend = backend or DenseBackend(self.config.sliding_windows, kv_dtype=self.dtype)

    def run(self, batch: AttentionBatch) -> torch.Tensor:
        """Forward one flat batch: store its K/V in the backend; logits [num_seqs, vocab], fp32."""
        longest = max(c + n for c, n in zip(batch.num_cached, batch.query_lens, strict=True))
        if longest > self.config.max_position_embeddings:
            raise KVSqueezeError(f"{longest} tokens is past the model's {self.config.max_position_embeddings}")
        return self.model.forward(batch, self.backend)

    def free(self, seq_id: int) -> None:
        """Drop a finished sequence's K/V from the backend."""
        self.backend.free(seq_id)
