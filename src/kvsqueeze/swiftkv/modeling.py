"""The SwiftKV forward for Llama-architecture models (Qiao et al., arXiv 2410.03960).

SingleInputKV: layers below l run as in Llama. Then one projection of layer l's
normed input gives the keys and values of every layer >= l at once (one matmul), and
the layers >= l run only for the positions whose output is needed: on a prefill the
last prompt token (the last `window` ones when a KVSqueezeCache scores with them),
every token when all logits are asked for (training, perplexity) and every new token
after the prefill. AcrossKV: the layers of a group attend over their leader's K/V,
which is stored once.

The decoder layers keep Llama's modules and weight names, so a converted model's
state dict is the original's plus `model.swiftkv.*`.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    eager_attention_forward,
    rotate_half,
)
from transformers.utils.deprecation import deprecate_kwarg

from kvsqueeze.hf.cache import ATTENTION_NAME, KVSqueezeCache, PendingStep
from kvsqueeze.swiftkv.config import MODEL_TYPE, SwiftKVLlamaConfig

Rotary = tuple[torch.Tensor, torch.Tensor]
KV = tuple[torch.Tensor | PendingStep, torch.Tensor | PendingStep]


def rotate(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """RoPE on x [b, heads, t, d] with (cos, sin) [b, t, d], as Llama applies it."""
    cos, sin = (r.unsqueeze(1) for r in rotary)
    return x * cos + rotate_half(x) * sin


class SwiftKVProjection(nn.Module):
    """SingleInputKV: a norm of layer l's input and one fused K/V projection for the
    leaders of all layers >= l (rows: leader 0's K, its V, leader 1's K, ...)."""

    def __init__(self, config: SwiftKVLlamaConfig) -> None:
        super().__init__()
        self.num_kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        out = 2 * len(config.kv_leaders()) * self.num_kv_heads * self.head_dim
        self.kv_proj = nn.Linear(config.hidden_size, out, bias=config.attention_bias)

    def forward(self, hidden: torch.Tensor, rotary: Rotary) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) [b, kv_heads, t, d] per leader, keys rotated."""
        b, t, _ = hidden.shape
        kv = self.kv_proj(self.norm(hidden)).view(b, t, -1, 2, self.num_kv_heads, self.head_dim)
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # [leaders, k|v, b, kv_heads, t, d]
        return [(rotate(k, rotary), v) for k, v in kv]


def upper_layer(
    layer: LlamaDecoderLayer,
    hidden: torch.Tensor,
    kv: KV,
    rotary: Rotary,
    mask: torch.Tensor | None,
    attn_implementation: str,
    **kwargs,
) -> torch.Tensor:
    """LlamaDecoderLayer.forward with keys/values given (already in the cache) instead of
    projected from `hidden`, which may hold only the last positions of the chunk."""
    attn = layer.self_attn
    b, w, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    query = rotate(attn.q_proj(normed).view(b, w, -1, attn.head_dim).transpose(1, 2), rotary)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation, eager_attention_forward)
    dropout = attn.attention_dropout if attn.training else 0.0
    out, _ = interface(attn, query, kv[0], kv[1], mask, dropout=dropout, scaling=attn.scaling, **kwargs)
    hidden = hidden + attn.o_proj(out.reshape(b, w, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def shared_read(kv: KV) -> KV:
    """What a non-leader AcrossKV layer attends over: its leader's K/V of this forward;
    a KVSqueezeCache step is marked shared so that it is not stored a second time."""
    if isinstance(kv[0], PendingStep):
        step = replace(kv[0], shared=True)
        return step, step
    return kv


class SwiftKVLlamaModel(LlamaModel):
    """LlamaModel with SingleInputKV (from layer l) and AcrossKV (groups of leaders)."""

    config_class = SwiftKVLlamaConfig

    def __init__(self, config: SwiftKVLlamaConfig) -> None:
        super().__init__(config)
        # With l = L nothing is skipped and there is nothing to project.
        self.swiftkv = SwiftKVProjection(config) if config.kv_leaders() else None
        self.post_init()

    def upper_tokens(self, q_len: int, past: int, cache: Cache | None, logits_to_keep: int | torch.Tensor) -> int:
        """How many last positions of this chunk run the layers >= l."""
        if past > 0 or not isinstance(logits_to_keep, int) or logits_to_keep <= 0:
            return q_len  # after the prefill, or every position's logits asked for
        if isinstance(cache, KVSqueezeCache):
            # The policy scores each layer's keys with its last `window` prompt queries.
            return min(q_len, max(logits_to_keep, cache.policy.window))
        return min(q_len, logits_to_keep)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        q_len = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = (torch.arange(q_len, device=inputs_embeds.device) + past).unsqueeze(0)
        mask_args = dict(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        mask = create_causal_mask(**mask_args, cache=cache, position_ids=position_ids)
        hidden = inputs_embeds
        rotary = self.rotary_emb(hidden, position_ids=position_ids)
        l_kv = self.config.swiftkv_kv_layer
        for layer in self.layers[:l_kv]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, cache=cache, **kwargs)
        if self.swiftkv is not None:
            hidden = self._upper(
                hidden, rotary, mask, cache, self.upper_tokens(q_len, past, cache, logits_to_keep), **kwargs
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)

    def _upper(self, hidden: torch.Tensor, rotary: Rotary, mask, cache: Cache | None, w: int, **kwargs) -> torch.Tensor:
        """Layers >= l over the last `w` positions, with K/V of all positions from layer l's input."""
        kvs = iter(self.swiftkv(hidden, rotary))
        t = hidden.shape[1]
        if w < t:
            hidden, rotary = hidden[:, -w:], (rotary[0][:, -w:], rotary[1][:, -w:])
            mask = tail_mask(mask, w, t, self.config._attn_implementation, hidden.device)
        kv: KV | None = None
        for j in range(self.config.swiftkv_kv_layer, self.config.num_hidden_layers):
            if self.config.kv_leader(j) == j:
                kv = next(kvs)
                if cache is not None:
                    kv = cache.update(*kv, j)
            else:
                kv = shared_read(kv)
            hidden = upper_layer(self.layers[j], hidden, kv, rotary, mask, self.config._attn_implementation, **kwargs)
        return hidden


def tail_mask(mask, w: int, t: int, attn_implementation: str, device: torch.device) -> torch.Tensor | None:
    """The attention mask for the last `w` of `t` queries: rows of a 4D mask; the
    kvsqueeze attention's 2D padding mask (or None) as is, since it aligns queries to
    the end of the keys; for sdpa's "no mask" (causal implied), an explicit
    bottom-right causal one, as SDPA's is_causal aligns queries to the start."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        return mask[..., -w:, :]
    if attn_implementation == ATTENTION_NAME or w == 1:
        return mask
    if mask is not None:
        raise ValueError(f"SwiftKV prefill skipping supports eager, sdpa and kvsqueeze attention, not {type(mask)}")
    rows = torch.arange(t - w, t, device=device)[:, None]
    return (rows >= torch.arange(t, device=device)[None, :])[None, None]


class SwiftKVLlamaForCausalLM(LlamaForCausalLM):
    """A causal LM over SwiftKVLlamaModel; `logits_to_keep` (1 in generate()'s prefill)
    also picks how many positions run the layers >= l."""

    config_class = SwiftKVLlamaConfig

    def __init__(self, config: SwiftKVLlamaConfig) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = SwiftKVLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


AutoConfig.register(MODEL_TYPE, SwiftKVLlamaConfig)
AutoModelForCausalLM.register(SwiftKVLlamaConfig, SwiftKVLlamaForCausalLM)
