"""Load base-model weights into the engine's layout: HF safetensors directories, GGUF files, random presets.

Every source yields the same flat dict that ``model.LlamaModel`` takes, with q/k/v and gate/up fused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine_daemon.model import ModelConfig
from engine_daemon.model_source import ModelSource

TensorGetter = Callable[[str], torch.Tensor]


def load_weights(source: ModelSource, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict:
    if source.kind == "hf":
        with _hf_tensors(source.path) as (names, get):
            return _assemble(config, names, get, _HF_NAMES, device, dtype)
    if source.kind == "gguf":
        names, get = _gguf_tensors(source.path, config)
        return _assemble(config, names, get, _GGUF_NAMES, device, dtype)
    if source.kind == "random":
        return random_weights(config, device, dtype)
    raise ValueError(f"unknown model source kind {source.kind!r}")


# Engine name → source name; {i} is the layer index.
_HF_NAMES = {
    "embed_tokens": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "input_layernorm": "model.layers.{i}.input_layernorm.weight",
    "post_attention_layernorm": "model.layers.{i}.post_attention_layernorm.weight",
    "q_proj": "model.layers.{i}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{i}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{i}.self_attn.v_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "o_proj": "model.layers.{i}.self_attn.o_proj.weight",
    "gate_proj": "model.layers.{i}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{i}.mlp.up_proj.weight",
    "down_proj": "model.layers.{i}.mlp.down_proj.weight",
}
_GGUF_NAMES = {
    "embed_tokens": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "input_layernorm": "blk.{i}.attn_norm.weight",
    "post_attention_layernorm": "blk.{i}.ffn_norm.weight",
    "q_proj": "blk.{i}.attn_q.weight",
    "k_proj": "blk.{i}.attn_k.weight",
    "v_proj": "blk.{i}.attn_v.weight",
    "q_bias": "blk.{i}.attn_q.bias",
    "k_bias": "blk.{i}.attn_k.bias",
    "v_bias": "blk.{i}.attn_v.bias",
    "o_proj": "blk.{i}.attn_output.weight",
    "gate_proj": "blk.{i}.ffn_gate.weight",
    "up_proj": "blk.{i}.ffn_up.weight",
    "down_proj": "blk.{i}.ffn_down.weight",
}


def _assemble(
    config: ModelConfig,
    names: set[str],
    get: TensorGetter,
    mapping: dict[str, str],
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    def load(key: str, i: int | None = None) -> torch.Tensor:
        name = mapping[key].format(i=i)
        if name not in names:
            raise ValueError(f"model weights lack tensor {name!r}")
        return get(name).to(device=device, dtype=dtype)

    weights = {"embed_tokens": load("embed_tokens"), "norm": load("norm")}
    if not config.tie_word_embeddings:
        weights["lm_head"] = load("lm_head")
    for i in range(config.num_layers):
        prefix = f"layers.{i}."
        weights[prefix + "input_layernorm"] = load("input_layernorm", i)
        weights[prefix + "post_attention_layernorm"] = load("post_attention_layernorm", i)
        weights[prefix + "qkv_proj"] = torch.cat([load("q_proj", i), load("k_proj", i), load("v_proj", i)])
        if config.attention_bias:
            weights[prefix + "qkv_proj.bias"] = torch.cat([load("q_bias", i), load("k_bias", i), load("v_bias", i)])
        weights[prefix + "o_proj"] = load("o_proj", i)
        weights[prefix + "gate_up_proj"] = torch.cat([load("gate_proj", i), load("up_proj", i)])
        weights[prefix + "down_proj"] = load("down_proj", i)
    _check_shapes(config, weights)
    return weights


def _check_shapes(config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    expected = {
        "embed_tokens": (config.vocab_size, config.hidden_size),
        "layers.0.qkv_proj": (config.q_size + 2 * config.kv_size, config.hidden_size),
        "layers.0.o_proj": (config.hidden_size, config.q_size),
        "layers.0.gate_up_proj": (2 * config.intermediate_size, config.hidden_size),
        "layers.0.down_proj": (config.hidden_size, config.intermediate_size),
    }
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"weight {name} has shape {tuple(weights[name].shape)}, config says {shape}")


class _hf_tensors:
    """Memory-mapped access to one or many (sharded) safetensors files of an HF model directory."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in sorted(folder.glob("*.safetensors"))]
            if not files:
                raise ValueError(f"{folder} holds no *.safetensors weights (pickled .bin checkpoints are not loaded)")
        self.handles = {f: safe_open(str(folder / f), framework="pt", device="cpu") for f in files}
        self.where = {name: f for f, h in self.handles.items() for name in h.keys()}

    def __enter__(self) -> tuple[set[str], TensorGetter]:
        return set(self.where), lambda name: self.handles[self.where[name]].get_tensor(name)

    def __exit__(self, *exc: object) -> None:
        self.handles.clear()


def _gguf_tensors(path: Path, config: ModelConfig) -> tuple[set[str], TensorGetter]:
    import gguf
    from gguf import quants

    reader = gguf.GGUFReader(str(path))
    by_name = {t.name: t for t in reader.tensors}
    arch = gguf_architecture(reader)

    def get(name: str) -> torch.Tensor:
        tensor = by_name[name]
        array = quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.array(array, dtype=np.float32, order="C")  # a writable copy: torch refuses read-only memory
        if arch == "llama":
            # llama.cpp's converter interleaves the two rotary halves of Q and K rows; undo it.
            if name.endswith("attn_q.weight"):
                array = _unpermute_rotary(array, config.num_heads)
            elif name.endswith("attn_k.weight"):
                array = _unpermute_rotary(array, config.num_kv_heads)
        return torch.from_numpy(array)

    return set(by_name), get


def gguf_architecture(reader: object) -> str:
    field = reader.fields["general.architecture"]  # type: ignore[attr-defined]
    return field.contents()


def _unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def random_weights(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random weights with a real model's shapes, drawn on the device (an 8B model needs no host copy)."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, device=device, dtype=dtype)

    h, qkv = config.hidden_size, config.q_size + 2 * config.kv_size
    weights = {"embed_tokens": normal(config.vocab_size, h), "norm": ones(h)}
    if not config.tie_word_embeddings:
        weights["lm_head"] = normal(config.vocab_size, h)
    for i in range(config.num_layers):
        prefix = f"layers.{i}."
        weights[prefix + "input_layernorm"] = ones(h)
        weights[prefix + "post_attention_layernorm"] = ones(h)
        weights[prefix + "qkv_proj"] = normal(qkv, h)
        if config.attention_bias:
            weights[prefix + "qkv_proj.bias"] = normal(qkv)
        weights[prefix + "o_proj"] = normal(h, config.q_size)
        weights[prefix + "gate_up_proj"] = normal(2 * config.intermediate_size, h)
        weights[prefix + "down_proj"] = normal(h, config.intermediate_size)
    return weights

