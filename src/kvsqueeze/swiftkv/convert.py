"""Llama -> SwiftKV (Qiao et al., arXiv 2410.03960): the original weights, plus the
SingleInputKV projection initialised so that, before any training, layer j >= l
computes its K/V from layer l's input exactly as its own modules would from its own
input; AcrossKV groups start from the mean of their layers' projections."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.swiftkv.config import SwiftKVLlamaConfig
from kvsqueeze.swiftkv.modeling import SwiftKVLlamaForCausalLM

ACROSS_GROUPS = (1, 2, 4)


def convert(model: PreTrainedModel, kv_layer: int | None = None, across_group: int = 1) -> SwiftKVLlamaForCausalLM:
    """A SwiftKV copy of a Llama-architecture `model` (the original is left as it is).

    kv_layer: the first layer whose K/V come from layer kv_layer's input (default
    L // 2; L skips nothing). across_group: adjacent layers from kv_layer on that
    share one KV cache entry (1, 2 or 4)."""
    if model.config.model_type != "llama":
        raise KVSqueezeError(f"SwiftKV converts Llama-architecture models, not {model.config.model_type!r}")
    num_layers = model.config.num_hidden_layers
    kv_layer = num_layers // 2 if kv_layer is None else kv_layer
    if not 1 <= kv_layer <= num_layers:
        raise KVSqueezeError(f"kv-layer must be in [1, {num_layers}] (the model's layers), got {kv_layer}")
    check_across_group(across_group)
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("model_type", "architectures")}
    config = SwiftKVLlamaConfig(**fields, swiftkv_kv_layer=kv_layer, swiftkv_across_group=across_group)
    config._attn_implementation = model.config._attn_implementation
    dtype = next(model.parameters()).dtype
    swift = SwiftKVLlamaForCausalLM(config).to(dtype=dtype, device=model.device)
    missing, unexpected = swift.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("model.swiftkv.") for name in missing):
        raise KVSqueezeError(f"weights do not match a Llama model: missing {missing}, unexpected {unexpected}")
    if swift.model.swiftkv is not None:
        init_projection(swift)
    swift.generation_config = model.generation_config
    return swift.eval()


def check_across_group(across_group: int) -> None:
    """AcrossKV groups of 1 (no sharing), 2 or 4 adjacent layers, as in the paper."""
    if across_group not in ACROSS_GROUPS:
        raise KVSqueezeError(f"across-kv must be one of {', '.join(map(str, ACROSS_GROUPS))}, got {across_group}")


@torch.no_grad()
def init_projection(model: SwiftKVLlamaForCausalLM) -> None:
    """Norm weight 1 and, per leader, the mean over its group of W_j diag(g_j), where g_j
    is layer j's input-norm weight: an RMS norm with weight g followed by W equals a
    weightless one followed by W diag(g), so each layer keeps its own norm's scaling."""
    config, layers, projection = model.config, model.model.layers, model.model.swiftkv
    projection.norm.weight.fill_(1.0)
    weights, biases = [], []
    for leader in config.kv_leaders():
        group = [j for j in range(leader, config.num_hidden_layers) if config.kv_leader(j) == leader]
        for name in ("k_proj", "v_proj"):
            projs = [getattr(layers[j].self_attn, name) for j in group]
            weights.append(
                torch.stack([p.weight * layers[j].input_layernorm.weight for p, j in zip(projs, group, strict=True)])
            )
            if projection.kv_proj.bias is not None:
                biases.append(torch.stack([p.bias for p in projs]))
    projection.kv_proj.weight.copy_(torch.cat([w.mean(dim=0) for w in weights]))
    if biases:
        projection.kv_proj.bias.copy_(torch.cat([b.mean(dim=0) for b in biases]))
