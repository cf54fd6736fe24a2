"""The PEFT LoRA format, read without torch: the one place that decides what we accept.

The engine (``adapters.py``) and the portal's upload validation both call ``validate_adapter``,
so an adapter the portal marks ``ready`` is exactly one the engine will load. Anything that
would change the model's output in a way we do not compute (DoRA, ``modules_to_save``, biases,
embedding or lm_head LoRA, pickles) is refused by name, never ignored: an adapter silently
served as the base model is worse than an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_HEADER_BYTES = 64 * 1024 * 1024

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_MODULES = ATTENTION_MODULES + MLP_MODULES
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}

# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (PEFT drops the adapter name on save)
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)


class AdapterError(ValueError):
    """An adapter we will not serve; the message names the field and the fix."""


@dataclass(frozen=True)
class ModelDescriptor:
    """What an adapter must fit: the shapes of every projection LoRA may target."""

    name: str
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int

    def projection_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of one projection."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        shapes = {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }
        return shapes[module]

    @property
    def fingerprint(self) -> str:
        """Identifies the architecture: adapters validated against one fingerprint fit any model with it."""
        fields = asdict(self)
        fields.pop("name")
        canonical = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(canonical).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["fingerprint"] = self.fingerprint
        data["projections"] = {m: list(self.projection_shape(m)) for m in LORA_MODULES}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDescriptor:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: data[k] for k in names})


def descriptor_from_config(name: str, config: dict[str, Any]) -> ModelDescriptor:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return ModelDescriptor(
        name=name,
        architecture=(config.get("architectures") or ["LlamaForCausalLM"])[0],
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
    )


def describe_base_model(model: str) -> ModelDescriptor:
    """The descriptor of a model name as the engine resolves it (no torch needed)."""
    from engine_daemon.model_source import resolve_model

    source = resolve_model(model)
    return descriptor_from_config(source.name, source.config)


# ---------------------------------------------------------------------------------------------
# adapter_config.json


@dataclass(frozen=True)
class LoraSpec:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank_and_alpha(self, module_path: str) -> tuple[int, float]:
        """PEFT's rule: the first pattern key that matches the end of the module path wins."""
        rank = _pattern_value(self.rank_pattern, module_path, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_path, self.lora_alpha)
        return int(rank), float(alpha)

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern: dict[str, Any], module_path: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


# Settings that change what the adapter computes; each must hold its neutral value.
_MUST_BE_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "modules_to_save": ((None, []), "full copies of modules (modules_to_save) are not served; retrain without them"),
    "use_dora": ((False, None), "DoRA (use_dora) is not supported; retrain with use_dora=False"),
    "bias": (("none", None), "LoRA biases (bias) are not supported; retrain with bias='none'"),
    "lora_bias": ((False, None), "LoRA biases (lora_bias) are not supported; retrain with lora_bias=False"),
    "fan_in_fan_out": ((False, None), "fan_in_fan_out=True is for GPT-2 Conv1D layers, not Llama-family models"),
    "layer_replication": ((None, []), "layer_replication is not supported"),
    "trainable_token_indices": ((None, [], {}), "trainable tokens (trainable_token_indices) are not supported"),
    "target_parameters": ((None, []), "LoRA on raw parameters (target_parameters) is not supported"),
    "use_qalora": ((False, None), "QA-LoRA (use_qalora) is not supported"),
    "use_bdlora": ((False, None), "use_bdlora is not supported"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (alora_invocation_tokens) is not supported"),
    "megatron_config": ((None, {}), "Megatron-parallel adapters (megatron_config) are not supported"),
}


def parse_adapter_config(raw: bytes | str | dict[str, Any]) -> LoraSpec:
    if isinstance(raw, dict):
        config = raw
    else:
        try:
            config = json.loads(raw, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{CONFIG_FILE} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{CONFIG_FILE}: peft_type is {peft_type!r}; only LORA adapters are served")
    for key, (neutral, message) in _MUST_BE_NEUTRAL.items():
        if key in config and config[key] not in neutral:
            raise AdapterError(f"{CONFIG_FILE}: {key}={config[key]!r}: {message}")

    r = _positive_int(config.get("r"), "r")
    alpha = config.get("lora_alpha", r)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterError(f"{CONFIG_FILE}: lora_alpha must be a positive number, got {alpha!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not isinstance(targets, list | tuple):
        raise AdapterError(f"{CONFIG_FILE}: target_modules must list the projections (e.g. ['q_proj', 'v_proj'])")
    unknown = [t for t in targets if t not in LORA_MODULES]
    if unknown:
        raise AdapterError(
            f"{CONFIG_FILE}: target_modules {unknown} are not served; LoRA may target only {list(LORA_MODULES)}"
        )
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterError(f"{CONFIG_FILE}: rank_pattern and alpha_pattern must be JSON objects")
    for key, value in rank_pattern.items():
        _positive_int(value, f"rank_pattern[{key!r}]")
    for key, value in alpha_pattern.items():
        if not isinstance(value, int | float) or value <= 0:
            raise AdapterError(f"{CONFIG_FILE}: alpha_pattern[{key!r}] must be a positive number")
    return LoraSpec(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora", False)),
        target_modules=tuple(sorted(set(targets))),
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in strict JSON")


def _positive_int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(f"{CONFIG_FILE}: {name} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# safetensors, header only


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: F16 / BF16 / F32
    shape: tuple[int, ...]
    start: int  # byte offsets inside the data section
    end: int


def read_safetensors_header(stream: BinaryIO, file_size: int) -> tuple[dict[str, TensorInfo], int]:
    """Parse the JSON header without reading any tensor data; returns (tensors, data_start)."""
    prefix = stream.read(8)
    if len(prefix) != 8:
        raise AdapterError(f"{WEIGHTS_FILE} is truncated: no header")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > min(MAX_HEADER_BYTES, file_size - 8):
        raise AdapterError(f"{WEIGHTS_FILE}: header length {header_len} is past the file size; not a safetensors file")
    try:
        header = json.loads(stream.read(header_len), parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{WEIGHTS_FILE}: header is not valid JSON ({exc}); not a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE}: header must be a JSON object")
    data_start = 8 + header_len
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterError(f"{WEIGHTS_FILE}: malformed header entry for {name!r}") from None
        if not all(_is_count(n) for n in (*shape, start, end)):
            # JSON allows 4.0, -1, true or "4" here; a float dimension would even pass the shape checks below.
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} has a shape or offsets that are not non-negative integers; "
                "not a safetensors file"
            )
        if dtype not in SAFETENSORS_DTYPES:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} has dtype {dtype}; save the adapter in float16, bfloat16 or float32"
            )
        expected = math.prod(shape) * _DTYPE_BYTES[dtype]
        if not (0 <= start <= end <= data_size) or end - start != expected:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} has offsets that do not match its shape or the file")
        tensors[name] = TensorInfo(name, dtype, shape, start, end)
    return tensors, data_start


# ---------------------------------------------------------------------------------------------
# The whole adapter against a base model


@dataclass(frozen=True)
class ModuleLora:
    layer: int
    module: str
    rank: int
    scaling: float
    a_name: str
    b_name: str


@dataclass
class AdapterManifest:
    rank: int  # the largest rank of any module
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: list[ModuleLora]
    dtype: str
    base_model: str
    base_fingerprint: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modules"] = [asdict(m) for m in self.modules]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterManifest:
        data = dict(data)
        data["modules"] = [ModuleLora(**m) for m in data["modules"]]
        return cls(**data)


def validate_adapter(
    spec: LoraSpec,
    tensors: dict[str, TensorInfo],
    base: ModelDescriptor,
    *,
    max_lora_rank: int,
    weights_bytes: int = 0,
) -> AdapterManifest:
    """Check every tensor against the base model; return what the engine needs to load it."""
    pairs: dict[tuple[int, str], dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        match = _TENSOR_NAME.match(name)
        if match is None:
            raise AdapterError(_explain_unknown_tensor(name))
        layer, _block, module, side = int(match[1]), match[2], match[3], match[4]
        if module not in LORA_MODULES:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} targets '{module}', which LoRA may not target here")
        if layer >= base.num_layers:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensor {name!r} is for layer {layer}, but {base.name} has {base.num_layers} layers"
            )
        pairs.setdefault((layer, module), {})[side] = info
    if not pairs:
        raise AdapterError(f"{WEIGHTS_FILE} holds no LoRA tensors")

    modules: list[ModuleLora] = []
    dtypes = set()
    for (layer, module), sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            missing = ({"A", "B"} - set(sides)).pop()
            raise AdapterError(f"{WEIGHTS_FILE}: layer {layer} {module} has no lora_{missing} tensor")
        a, b = sides["A"], sides["B"]
        in_f, out_f = base.projection_shape(module)
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != in_f or b.shape[0] != out_f or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{WEIGHTS_FILE}: layer {layer} {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit "
                f"{base.name} (expected lora_A [r, {in_f}] and lora_B [{out_f}, r]); was it trained on another base model?"
            )
        rank = a.shape[0]
        if rank > max_lora_rank:
            raise AdapterError(
                f"layer {layer} {module} has rank {rank}, above this engine's max_lora_rank {max_lora_rank}; "
                "retrain with a smaller r or raise max_lora_rank"
            )
        block = "self_attn" if module in ATTENTION_MODULES else "mlp"
        cfg_rank, alpha = spec.rank_and_alpha(f"model.layers.{layer}.{block}.{module}")
        if cfg_rank != rank:
            raise AdapterError(
                f"layer {layer} {module}: the weights have rank {rank} but {CONFIG_FILE} (r / rank_pattern) says {cfg_rank}"
            )
        if module not in spec.target_modules:
            raise AdapterError(f"{WEIGHTS_FILE} has weights for {module}, which target_modules does not list")
        dtypes.update((a.dtype, b.dtype))
        modules.append(ModuleLora(layer, module, rank, spec.scaling(rank, alpha), a.name, b.name))
    if len(dtypes) != 1:
        raise AdapterError(f"{WEIGHTS_FILE} mixes dtypes {sorted(dtypes)}; save every tensor in one dtype")
    return AdapterManifest(
        rank=max(m.rank for m in modules),
        lora_alpha=spec.lora_alpha,
        use_rslora=spec.use_rslora,
        target_modules=sorted({m.module for m in modules}),
        modules=modules,
        dtype=SAFETENSORS_DTYPES[dtypes.pop()],
        base_model=base.name,
        base_fingerprint=base.fingerprint,
        bytes=weights_bytes,
    )


def _explain_unknown_tensor(name: str) -> str:
    if "lora_magnitude_vector" in name:
        return f"{WEIGHTS_FILE}: {name!r} is a DoRA magnitude; DoRA is not supported"
    if "lora_embedding" in name or "embed_tokens" in name:
        return f"{WEIGHTS_FILE}: {name!r} is embedding LoRA, which is not supported; target only the projections"
    if "lm_head" in name:
        return f"{WEIGHTS_FILE}: {name!r} adapts lm_head, which is not supported; target only the projections"
    if name.endswith(".bias"):
        return f"{WEIGHTS_FILE}: {name!r} is a bias; retrain with bias='none'"
    return f"{WEIGHTS_FILE}: unknown tensor {name!r}; expected only ...layers.N.(self_attn|mlp).<proj>.lora_A/B.weight"


def validate_adapter_dir(path: str | Path, base: ModelDescriptor, *, max_lora_rank: int) -> AdapterManifest:
    """Validate a PEFT folder's config and weights header (no tensor data is read)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(
            f"{pickles[0]} is a pickle, which can run code when loaded and is never read; "
            "save the adapter with save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
        )
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"{CONFIG_FILE} is missing from {folder}")
    if not weights_path.is_file():
        raise AdapterError(f"{WEIGHTS_FILE} is missing from {folder}")
    spec = parse_adapter_config(config_path.read_bytes())
    size = weights_path.stat().st_size
    with weights_path.open("rb") as stream:
        tensors, _ = read_safetensors_header(stream, size)
    return validate_adapter(spec, tensors, base, max_lora_rank=max_lora_rank, weights_bytes=size)


def iter_nonfinite_tensors(path: str | Path, chunk_bytes: int = 1 << 22) -> Iterator[str]:
    """Names of tensors holding NaN or Inf, read in chunks so a large file never sits in memory."""
    import numpy as np

    path = Path(path)
    with path.open("rb") as stream:
        tensors, data_start = read_safetensors_header(stream, path.stat().st_size)
        for info in sorted(tensors.values(), key=lambda t: t.start):
            width = _DTYPE_BYTES[info.dtype]
            step = max(width, chunk_bytes - chunk_bytes % width)
            stream.seek(data_start + info.start)
            remaining = info.end - info.start
            while remaining > 0:
                raw = stream.read(min(step, remaining))
                remaining -= len(raw)
                if not _all_finite(np, raw, info.dtype):
                    yield info.name
                    break


def _all_finite(np: Any, raw: bytes, dtype: str) -> bool:
    if dtype == "BF16":  # numpy has no bfloat16: all exponent bits set means Inf or NaN
        bits = np.frombuffer(raw, dtype="<u2")
        return not bool(np.any((bits & 0x7F80) == 0x7F80))
    values = np.frombuffer(raw, dtype="<f2" if dtype == "F16" else "<f4")
    return bool(np.isfinite(values).all())


# ---------------------------------------------------------------------------------------------
# The shared adapter cache: ADAPTER_CACHE_DIR/<sha256>/{adapter_config.json, adapter_model.safetensors, manifest.json}

MANIFEST_FILE = "manifest.json"


def adapter_content_sha256(config_path: str | Path, weights_path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The cache key of an adapter version: sha256 over its config bytes, then its weights bytes."""
    digest = hashlib.sha256()
    for path in (config_path, weights_path):
        with Path(path).open("rb") as stream:
            while chunk := stream.read(chunk_bytes):
                digest.update(chunk)
    return digest.hexdigest()


def cached_adapter_dir(cache_dir: str | Path, sha256: str) -> Path:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
        raise AdapterError(f"{sha256!r} is not a sha256 content hash")
    return Path(cache_dir) / sha256
