"""Our own forward for the Llama family (Llama, Mistral, Qwen2), on plain tensors.

One implementation, the differences as config: q/k/v biases (Qwen2, Llama's attention_bias)
come with the checkpoint's tensors, sliding windows per layer (Mistral, Qwen2's layer_types)
go to the attention backend, rope scaling to the rotary table. The forward runs on a flat
batch of tokens of many sequences; attention is the backend's business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from kvsqueeze.engine.attention_batch import AttentionBackend, AttentionBatch
from kvsqueeze.engine.linear import Linear, can_prepack, widens_bf16
from kvsqueeze.engine.rope import RotaryEmbedding
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.ops.fused_layer_ops import apply_rope, rms_norm, silu_mul

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}
SWIFTKV_MODEL_TYPE = "kvsqueeze_swiftkv_llama"  # swiftkv/config.py's, spelled here: the engine imports no transformers
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", SWIFTKV_MODEL_TYPE)
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    """What the forward needs from a Llama-family config.json."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    sliding_windows: tuple[int | None, ...]  # per layer: keys a query sees, itself included; None = all
    eos_token_ids: tuple[int, ...] = field(default=())
    # SwiftKV (swiftkv/): layers >= kv_layer take K/V from one projection of layer kv_layer's
    # input; groups of `across_group` of them share one cache entry. kv_layer = num_layers: plain.
    swiftkv_kv_layer: int | None = None
    swiftkv_across_group: int = 1

    @property
    def kv_layer(self) -> int:
        return self.num_layers if self.swiftkv_kv_layer is None else self.swiftkv_kv_layer

    def kv_entry(self, layer: int) -> int:
        """The cache entry layer `layer` reads: its own below kv_layer, else its AcrossKV group's."""
        if layer < self.kv_layer:
            return layer
        return self.kv_layer + (layer - self.kv_layer) // self.swiftkv_across_group

    @property
    def num_kv_entries(self) -> int:
        """Distinct KV caches the model stores: one per layer, one per AcrossKV group above kv_layer."""
        return self.kv_entry(self.num_layers - 1) + 1

    def is_kv_leader(self, layer: int) -> bool:
        """Whether `layer` writes its cache entry (the first layer of an AcrossKV group does)."""
        return layer < self.kv_layer or (layer - self.kv_layer) % self.swiftkv_across_group == 0

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        """Parse config.json, in transformers' 4.x (rope_theta, rope_scaling) or 5.x (rope_parameters) form."""
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise KVSqueezeError(f"model type {model_type!r} is not supported; the engine runs {SUPPORTED_MODEL_TYPES}")
        num_heads = cfg["num_attention_heads"]
        num_layers = cfg["num_hidden_layers"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
        if rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
            raise KVSqueezeError("partial rotary embeddings are not supported")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise KVSqueezeError(f"rope type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)} are)")
        if rope_type == "default":
            rope = {}
        hidden_act = cfg.get("hidden_act", "silu")
        if hidden_act not in ACTIVATIONS:
            raise KVSqueezeError(f"activation {hidden_act!r} is not supported ({', '.join(ACTIVATIONS)} are)")
        eos = cfg.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope or None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            hidden_act=hidden_act,
            sliding_windows=sliding_windows(cfg, num_layers),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            swiftkv_kv_layer=cfg.get("swiftkv_kv_layer") if model_type == SWIFTKV_MODEL_TYPE else None,
            swiftkv_across_group=cfg.get("swiftkv_across_group", 1) if model_type == SWIFTKV_MODEL_TYPE else 1,
        )


def sliding_windows(cfg: dict, num_layers: int) -> tuple[int | None, ...]:
    """Each layer's window: `layer_types` when the config lists them (transformers 5, Qwen2);
    else Qwen2's use_sliding_window / max_window_layers; else Mistral's one window for all layers."""
    window = cfg.get("sliding_window")
    if cfg.get("layer_types"):
        return tuple(window if t == "sliding_attention" else None for t in cfg["layer_types"])
    if cfg.get("model_type") == "qwen2":
        if not cfg.get("use_sliding_window"):
            return (None,) * num_layers
        first = cfg.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (window,) * num_layers


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused into one matmul each (concatenated at load)."""

    input_norm: torch.Tensor
    qkv: Linear
    o: Linear
    post_norm: torch.Tensor
    gate_up: Linear
    down: Linear
    q: Linear | None = None  # SwiftKV's layers above kv_layer project only queries


class LlamaModel:
    """Embedding, decoder layers and LM head over one dtype; `forward` returns last-token logits."""

    def __init__(
        self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.config = config
        self.dtype = dtype

        def get(name: str) -> torch.Tensor:
            return weights[name].to(device=device, dtype=dtype).contiguous()

        def fused(names: list[str]) -> torch.Tensor | None:
            # A bias exists for all of q/k/v (or gate/up) or for none.
            if names[0] not in weights:
                return None
            return torch.cat([weights[n] for n in names]).to(device=device, dtype=dtype).contiguous()

        def maybe(name: str) -> torch.Tensor | None:
            return get(name) if name in weights else None

        prepack, widen = can_prepack(dtype, torch.device(device)), widens_bf16(dtype, torch.device(device))

        def linear(names: list[str], biases: list[str]) -> Linear:
            return Linear(fused(names), fused(biases), prepack, widen)

        self.embed = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        lm_head = self.embed if config.tie_word_embeddings else maybe("lm_head.weight")
        self.lm_head = Linear(self.embed if lm_head is None else lm_head, None, prepack, widen)  # None: ties unsaid
        self.layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn, mlp = p + "self_attn.", p + "mlp."
            layer = LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                qkv=linear([attn + f"{x}_proj.weight" for x in "qkv"], [attn + f"{x}_proj.bias" for x in "qkv"]),
                o=linear([attn + "o_proj.weight"], [attn + "o_proj.bias"]),
                post_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=linear(
                    [mlp + "gate_proj.weight", mlp + "up_proj.weight"], [mlp + "gate_proj.bias", mlp + "up_proj.bias"]
                ),  # fmt: skip
                down=linear([mlp + "down_proj.weight"], [mlp + "down_proj.bias"]),
            )
            if i >= config.kv_layer:
                layer.q = linear([attn + "q_proj.weight"], [attn + "q_proj.bias"])
            self.layers.append(layer)
        # SingleInputKV: a norm of layer kv_layer's input and one fused K/V projection for
        # every cache entry above it (rows: entry 0's K, its V, entry 1's K, ...).
        self.swift_norm = maybe("model.swiftkv.norm.weight")
        swift = "model.swiftkv.kv_proj."
        self.swift_kv = linear([swift + "weight"], [swift + "bias"]) if swift + "weight" in weights else None
        if config.kv_layer < config.num_layers and self.swift_kv is None:
            raise KVSqueezeError("a SwiftKV config without model.swiftkv.kv_proj weights")
        self.rope = RotaryEmbedding(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings, dtype, device
        )
        self.act = ACTIVATIONS[config.hidden_act]

    @property
    def weight_nbytes(self) -> int:
        """Bytes of weights a decode step reads: every layer's (queries only above SwiftKV's
        kv_layer) and the LM head (the embedding is read a row per token)."""
        total = self.lm_head.weight.nbytes + self.norm.nbytes
        for w in self.layers:
            linears = [w.q or w.qkv, w.o, w.gate_up, w.down]
            total += w.input_norm.nbytes + w.post_norm.nbytes
            total += sum(x.weight.nbytes + (0 if x.bias is None else x.bias.nbytes) for x in linears)
        return total

    @torch.inference_mode()
    def forward(self, batch: AttentionBatch, backend: AttentionBackend) -> torch.Tensor:
        """Logits [num_seqs, vocab] (fp32) of each sequence's last token in the flat batch."""
        cfg = self.config
        T, nh, nkv, d, eps = batch.num_tokens, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        cos, sin = self.rope.lookup(batch.positions)
        x = F.embedding(batch.input_ids, self.embed)
        for i, w in enumerate(self.layers[: cfg.kv_layer]):
            qkv = w.qkv(rms_norm(x, w.input_norm, eps)).view(T, nh + 2 * nkv, d)
            # q and k rotate together: one set of elementwise ops per layer instead of two.
            qk = apply_rope(qkv[:, : nh + nkv], cos, sin)
            out = backend.attend(i, qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :], batch)
            x = self._residual(x, out.reshape(T, nh * d), w)
        logits_rows = batch.logits_indices
        if cfg.kv_layer < cfg.num_layers:
            x, logits_rows = self._upper(x, batch, backend, cos, sin)
        # Only the rows that are sampled from go through the final norm and the LM head.
        x = rms_norm(x[logits_rows], self.norm, eps)
        return self.lm_head(x).float()

    def _residual(self, x: torch.Tensor, attn: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        """The rest of a decoder layer after attention: output projection and MLP, with residuals."""
        x = x + w.o(attn)
        gate_up = w.gate_up(rms_norm(x, w.post_norm, self.config.rms_norm_eps))
        if self.config.hidden_act == "silu":
            hidden = silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, -1)
            hidden = self.act(gate) * up
        return x + w.down(hidden)

    def _upper(
        self, x: torch.Tensor, batch: AttentionBatch, backend: AttentionBackend, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SwiftKV's layers >= kv_layer: every token's K/V of every entry from one projection of
        layer kv_layer's input; the layers themselves run only for each sequence's last
        `tail_lens` tokens. Returns those rows' hidden states and where the logits rows are."""
        cfg = self.config
        T, nh, nkv, d, eps = batch.num_tokens, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        kv = self.swift_kv(rms_norm(x, self.swift_norm, eps))
        kv = kv.view(T, -1, 2, nkv, d)  # [T, entries, k|v, kv_heads, d]
        tails = batch.tail_lens or batch.query_lens
        ends = batch.cu_seqlens_q[1:].tolist()
        rows = torch.tensor([r for end, m in zip(ends, tails, strict=True) for r in range(end - m, end)])
        x, cos_q, sin_q = x[rows], cos[rows], sin[rows]
        keys = apply_rope(kv[:, :, 0].reshape(T, -1, d), cos, sin).view(T, -1, nkv, d)  # [T, entries, kv_heads, d]
        for i in range(cfg.kv_layer, cfg.num_layers):
            w, entry = self.layers[i], cfg.kv_entry(i) - cfg.kv_layer
            q = w.q(rms_norm(x, w.input_norm, eps))
            q = apply_rope(q.view(-1, nh, d), cos_q, sin_q)
            out = backend.attend(
                i, q, keys[:, entry], kv[:, entry, 1], batch, query_lens=tails, writes=cfg.is_kv_leader(i)
            )
            x = self._residual(x, out.reshape(-1, nh * d), w)
        return x, torch.tensor(tails).cumsum(0) - 1
