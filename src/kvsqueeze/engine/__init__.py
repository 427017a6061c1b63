"""The serving engine (nano-vllm's shape): our own Llama-family forward over HF safetensors,
flat continuous batches, and pluggable attention backends."""

from kvsqueeze.engine.attention_batch import AttentionBackend, AttentionBatch
from kvsqueeze.engine.dense_backend import DenseBackend
from kvsqueeze.engine.model import LlamaModel, ModelConfig
from kvsqueeze.engine.model_runner import ModelRunner

__all__ = ["AttentionBackend", "AttentionBatch", "DenseBackend", "LlamaModel", "ModelConfig", "ModelRunner"]
