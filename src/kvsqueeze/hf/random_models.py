"""Random-weight models with the exact shapes of real architectures, for speed work:
decode speed depends on shapes and bytes, not on what the weights say."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PreTrainedModel, Qwen2Config

from kvsqueeze.errors import KVSqueezeError

RANDOM_PREFIX = "random:"

# Llama-3.1-8B and Mistral-7B share their transformer body; they differ in vocabulary and RoPE.
SEVEN_B_BODY = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
)

# Published shapes of each model's config.json.
RANDOM_SHAPES = {
    "llama-3.1-8b": (
        LlamaConfig,
        dict(
            **SEVEN_B_BODY,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        ),
    ),
    "mistral-7b": (
        MistralConfig,
        dict(
            **SEVEN_B_BODY,
            vocab_size=32768,
            max_position_embeddings=32768,
            sliding_window=None,
        ),
    ),
    "qwen2.5-7b": (
        Qwen2Config,
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
        ),
    ),
    "smollm2-135m": (
        LlamaConfig,
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
    ),
}


def random_model(name: str, dtype: torch.dtype, device: str) -> PreTrainedModel:
    """`random:<shape>` -> a model built directly on `device` in `dtype`, small random weights."""
    shape = name.removeprefix(RANDOM_PREFIX)
    if shape not in RANDOM_SHAPES:
        raise KVSqueezeError(f"unknown random model {name!r}; choose from: {', '.join(random_model_names())}")
    config_cls, fields = RANDOM_SHAPES[shape]
    config = config_cls(**fields)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_model_names() -> list[str]:
    return [RANDOM_PREFIX + name for name in RANDOM_SHAPES]
