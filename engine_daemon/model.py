"""One Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over a paged KV cache, with multi-LoRA.

The model takes a flat batch: the tokens of every scheduled sequence concatenated (decode
tokens and prefill chunks alike), their positions, and where their K/V go in the paged cache.
Every projection adds the LoRA term of each token's own adapter through ``kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import kernels
from engine_daemon.lora import GATE_UP, QKV, LoraBatch
from engine_daemon.peft_format import descriptor_from_config


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None  # Mistral: the engine serves contexts up to this length only
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        # The shapes come from the same parser the portal validates adapters with, so the two can
        # never disagree on e.g. the head_dim default.
        shape = descriptor_from_config("", config)
        eos = config.get("eos_token_id")
        # transformers 5 writes rope_parameters (theta inside); older configs rope_theta + rope_scaling.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_kind = rope.get("rope_type", rope.get("type"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=shape.architecture,
            vocab_size=shape.vocab_size,
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_layers=shape.num_layers,
            num_heads=shape.num_heads,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            max_position_embeddings=shape.max_position_embeddings,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama may declare them.
            attention_bias=shape.architecture == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False)),
            rope_scaling=rope if rope_kind not in (None, "default") else None,
            sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache; built once per step, shared by all layers."""

    slot_mapping: torch.Tensor  # int64 [T] flat cache slot of each token
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B] context length including this step's tokens
    query_start_loc: torch.Tensor  # int32 [B+1]


# Up to this many rows, x Wᵀ runs faster on CPU as (W xᵀ)ᵀ: MKL then streams the wide weight
# once for all rows.
_TRANSPOSED_GEMM_MAX_ROWS = 128


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, in] @ weight [out, in]ᵀ -> contiguous [T, out]."""
    if x.device.type == "cpu" and x.shape[0] <= _TRANSPOSED_GEMM_MAX_ROWS:
        return (weight @ x.T).T.contiguous()
    return x @ weight.T


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 as HF does, then cast back before the weight multiply.
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        original = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        in_band = (wavelen <= original / low) & (wavelen >= original / high)
        inv_freq = torch.where(in_band, blended, inv_freq)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half convention: x [T, H, D], cos/sin [T, D/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class LlamaModel:
    """Weights as plain tensors (no nn.Module tree): q/k/v and gate/up fused for fewer GEMMs;
    attention and the KV store through the engine's kernel backend."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 backend: kernels.Backend) -> None:
        self.config = config
        self.device = device
        self.backend = backend
        self.dtype = weights["embed_tokens"].dtype
        self.embed_tokens = weights["embed_tokens"]
        self.norm = weights["norm"]
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else weights["lm_head"]
        self.layers = [
            {name: weights[f"layers.{i}.{name}"] for name in _LAYER_TENSORS if f"layers.{i}.{name}" in weights}
            for i in range(config.num_layers)
        ]
        inv_freq = rope_inverse_frequencies(config).to(device)
        positions = torch.arange(config.max_position_embeddings, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        self.rope_cos, self.rope_sin = freqs.cos(), freqs.sin()
        self.scale = config.head_dim**-0.5

    def weight_bytes(self) -> int:
        tensors = [self.embed_tokens, self.norm] + [t for layer in self.layers for t in layer.values()]
        if not self.config.tie_word_embeddings:
            tensors.append(self.lm_head)
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # int64 [T]
        positions: torch.Tensor,  # int64 [T]
        attn: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora: LoraBatch | None,
        logits_indices: torch.Tensor,  # int64 [B'] rows whose next-token logits are wanted
    ) -> torch.Tensor:
        cfg = self.config
        h = self.embed_tokens[input_ids]
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer["input_layernorm"], cfg.rms_norm_eps)
            qkv = self._project(x, layer, "qkv_proj", QKV, i, lora)
            q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
            q = apply_rope(q.reshape(-1, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rope(k.reshape(-1, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = v.reshape(-1, cfg.num_kv_heads, cfg.head_dim)
            k_cache, v_cache = kv_caches[i]
            self.backend.store_kv(k, v, k_cache, v_cache, attn.slot_mapping)
            o = self.backend.paged_attention(
                q, k_cache, v_cache, attn.block_tables, attn.seq_lens, attn.query_start_loc, self.scale
            )
            o = o.reshape(-1, cfg.q_size)
            h = h + self._project(o, layer, "o_proj", ("o_proj",), i, lora)

            x = rms_norm(h, layer["post_attention_layernorm"], cfg.rms_norm_eps)
            gate_up = self._project(x, layer, "gate_up_proj", GATE_UP, i, lora)
            gate, up = gate_up.chunk(2, dim=-1)
            # Contiguous input for down_proj's LoRA shrink.
            act = (F.silu(gate) * up).contiguous()
            h = h + self._project(act, layer, "down_proj", ("down_proj",), i, lora)
        h = rms_norm(h[logits_indices], self.norm, cfg.rms_norm_eps)
        return linear(h, self.lm_head).float()

    def _project(
        self,
        x: torch.Tensor,
        layer: dict[str, torch.Tensor],
        fused: str,
        parts: tuple[str, ...],
        index: int,
        lora: LoraBatch | None,
    ) -> torch.Tensor:
        out = linear(x, layer[fused])
        bias = layer.get(fused + ".bias")
        if bias is not None:
            out = out + bias
        if lora is not None:
            lora.apply(x, out, index, parts)
        return out


_LAYER_TENSORS = (
    "input_layernorm",
    "post_attention_layernorm",
    "qkv_proj",
    "qkv_proj.bias",
    "o_proj",
    "gate_up_proj",
    "down_proj",
)
