"""Reading a Hugging Face model folder without transformers: config.json and safetensors
(one file, or shards listed in model.safetensors.index.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from kvsqueeze.errors import KVSqueezeError


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_config(model_dir: str | Path) -> dict:
    """The raw config.json of a model folder."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise KVSqueezeError(f"{model_dir} has no config.json: not a Hugging Face model folder")
    return read_json(path)


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The folder's weight files: the shards of the index if there is one, else model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / name for name in sorted(set(read_json(index)["weight_map"].values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise KVSqueezeError(f"{model_dir} has no model.safetensors (nor a sharded index)")


def load_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder by name, on CPU, in the dtype they were saved in."""
    weights: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        weights.update(load_file(path))
    return weights
