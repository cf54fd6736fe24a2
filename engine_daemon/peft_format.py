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

from engine_daemon.lora_patterns import PatternError, pattern_values

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"  # written by the upload validation into each staged cache folder
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# Bounds on a safetensors header, so that a hostile one costs no more to refuse than a large adapter
# costs to read. The largest Llama (126 layers, all seven projections) has 1,764 LoRA tensors in about
# 265 KB of header; MAX_TENSORS is ten times that, and MAX_HEADER_BYTES leaves 256 bytes for each.
# Parsing JSON can take ~25 bytes of memory per header byte ([[],[],...]), so 4 MiB keeps the worst
# header near 100 MiB, far inside the validation child's limit.
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_TENSORS = 16_384
MAX_TENSOR_DIMS = 8
MAX_DIM = 2**31  # also the largest rank a rank_pattern may give
MAX_TENSOR_NAME_CHARS = 1024
_MAX_HEADER_INT_DIGITS = 20  # a u64: every size and offset in the format is one
_RESAVE = "re-save the adapter with safetensors' save_file or PEFT's save_pretrained"

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

    code = "adapter_unavailable"  # what a request that needs the adapter fails with


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

    def ranks_and_alphas(self, module_paths: list[str]) -> dict[str, tuple[int, float]]:
        """Each module path's (rank, alpha): PEFT's first matching pattern key, else r / lora_alpha.

        Matching is bounded in time, and a key that matches none of ``module_paths`` is refused.
        """
        try:
            ranks = pattern_values(self.rank_pattern, module_paths, field="rank_pattern")
            alphas = pattern_values(self.alpha_pattern, module_paths, field="alpha_pattern")
        except PatternError as exc:
            raise AdapterError(f"{CONFIG_FILE}: {exc}") from None
        return {
            path: (int(ranks.get(path, self.r)), float(alphas.get(path, self.lora_alpha))) for path in module_paths
        }

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


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
    alpha = _positive_number(config.get("lora_alpha", r), "lora_alpha")
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
        if _positive_int(value, f"rank_pattern[{key!r}]") > MAX_DIM:
            raise AdapterError(f"{CONFIG_FILE}: rank_pattern[{key!r}] is above 2**31; a rank is a small integer such as 8")
    for key, value in alpha_pattern.items():
        _positive_number(value, f"alpha_pattern[{key!r}]")
    return LoraSpec(
        r=r,
        lora_alpha=alpha,
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


def _positive_number(value: Any, name: str) -> float:
    """A finite positive float: JSON's 1e999 reads as inf, 10**400 overflows a float, and true is no number."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise AdapterError(f"{CONFIG_FILE}: {name} must be a positive number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise AdapterError(
            f"{CONFIG_FILE}: {name} is not finite ({number}); JSON numbers past 1.8e308 read as infinity, "
            "set it to the alpha the adapter was trained with, such as 16"
        )
    if number <= 0:
        raise AdapterError(f"{CONFIG_FILE}: {name} must be a positive number, got {value!r}")
    return number


# ---------------------------------------------------------------------------------------------
# safetensors, header only


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: F16 / BF16 / F32
    shape: tuple[int, ...]
    start: int  # byte offsets inside the data section
    end: int


def safetensors_header_json(stream: BinaryIO, file_size: int) -> tuple[dict[str, Any], int]:
    """The header as the format frames it: a little-endian u64 length that fits the file, then one
    UTF-8 JSON object. Returns (header, data_start); raises when the file is no safetensors at all.
    """
    prefix = stream.read(8)
    if len(prefix) != 8:
        raise AdapterError(f"{WEIGHTS_FILE} is truncated: no header")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > file_size - 8:
        raise AdapterError(f"{WEIGHTS_FILE}: header length {header_len} is past the file size; not a safetensors file")
    if header_len > MAX_HEADER_BYTES:
        raise AdapterError(
            f"{WEIGHTS_FILE}: header is {header_len} bytes, more than the {MAX_HEADER_BYTES} read; "
            "an adapter's header is a few hundred kilobytes"
        )
    try:
        # Decoded first: json.loads would also take UTF-16 or UTF-32 bytes, which the engine's reader refuses.
        header = json.loads(
            stream.read(header_len).decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_int=_header_int,
            object_pairs_hook=_unique_keys,
        )
    except AdapterError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        raise AdapterError(f"{WEIGHTS_FILE}: header is not valid JSON ({exc}); not a safetensors file") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{WEIGHTS_FILE}: header must be a JSON object")
    return header, 8 + header_len


def read_safetensors_header(stream: BinaryIO, file_size: int) -> tuple[dict[str, TensorInfo], int]:
    """Parse the JSON header without reading any tensor data; returns (tensors, data_start).

    Beyond the framing, the format's own rules, each checked in time bounded by the header's size:
    ``__metadata__`` maps strings to strings; each tensor has a dtype we serve, at most
    MAX_TENSOR_DIMS dimensions of at most MAX_DIM and offsets that match its shape; and sorted by
    offset the tensors tile the data section exactly (no overlap, no gap, nothing after the last),
    so each byte belongs to one tensor and a scan of the data reads it once. An empty tensor is
    legal safetensors but never LoRA: it is refused, so that every tensor owns bytes of its own.
    """
    header, data_start = safetensors_header_json(stream, file_size)
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise AdapterError(f"{WEIGHTS_FILE}: __metadata__ must be a JSON object of strings to strings; {_RESAVE}")
    if len(header) > MAX_TENSORS:
        raise AdapterError(
            f"{WEIGHTS_FILE}: header lists {len(header)} tensors, above the {MAX_TENSORS} allowed; "
            "a LoRA adapter has two per adapted projection"
        )
    tensors = {name: _tensor_info(name, entry, data_size) for name, entry in header.items()}
    _check_tiling(tensors, data_size)
    return tensors, data_start


def _tensor_info(name: str, entry: Any, data_size: int) -> TensorInfo:
    if len(name) > MAX_TENSOR_NAME_CHARS:
        raise AdapterError(
            f"{WEIGHTS_FILE}: a tensor name is {len(name)} characters long, above {MAX_TENSOR_NAME_CHARS}; "
            f"PEFT's are under 100 ({_shown(name)})"
        )
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{WEIGHTS_FILE}: malformed header entry for {name!r}") from None
    if isinstance(shape, list) and len(shape) > MAX_TENSOR_DIMS:
        raise AdapterError(
            f"{WEIGHTS_FILE}: tensor {name!r} has {len(shape)} dimensions, above {MAX_TENSOR_DIMS}; "
            "LoRA weights are matrices"
        )
    if not isinstance(shape, list) or not all(_is_count(n) for n in (*shape, start, end)):
        # JSON allows 4.0, -1, true or "4" here; a float dimension would even pass the shape checks below.
        raise AdapterError(
            f"{WEIGHTS_FILE}: tensor {name!r} has a shape or offsets that are not non-negative integers; "
            "not a safetensors file"
        )
    if any(dim > MAX_DIM for dim in shape):
        raise AdapterError(
            f"{WEIGHTS_FILE}: tensor {name!r} has shape {shape}, with a dimension above 2**31; not a LoRA weight"
        )
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        shown = dtype if isinstance(dtype, str) and len(dtype) <= 16 else _shown(dtype)
        raise AdapterError(
            f"{WEIGHTS_FILE}: tensor {name!r} has dtype {shown}; "
            "save the adapter in float16, bfloat16 or float32"
        )
    if not start <= end <= data_size or _tensor_bytes(dtype, shape, limit=end - start) != end - start:
        raise AdapterError(
            f"{WEIGHTS_FILE}: tensor {name!r} has offsets that do not match its shape or the file "
            f"({dtype} {shape} at [{start}, {end}] of {data_size} data bytes); {_RESAVE}"
        )
    if start == end:
        raise AdapterError(f"{WEIGHTS_FILE}: tensor {name!r} is empty (shape {shape}); a LoRA weight never is, {_RESAVE}")
    return TensorInfo(name, dtype, tuple(shape), start, end)


def _tensor_bytes(dtype: str, shape: list[int], *, limit: int) -> int:
    """The tensor's size in bytes, or any number above ``limit`` once the product passes it."""
    size = _DTYPE_BYTES[dtype]
    for dim in shape:
        size *= dim
        if size > limit:
            return size
    return size


def _check_tiling(tensors: dict[str, TensorInfo], data_size: int) -> None:
    """Sorted by offset, the tensors cover the data section exactly, as safetensors itself requires."""
    covered, previous = 0, None
    for info in sorted(tensors.values(), key=lambda t: t.start):
        if info.start < covered:
            raise AdapterError(
                f"{WEIGHTS_FILE}: tensors {previous.name!r} and {info.name!r} overlap in the data section; "
                f"each tensor needs bytes of its own, {_RESAVE}"
            )
        if info.start > covered:
            raise AdapterError(
                f"{WEIGHTS_FILE}: data bytes [{covered}, {info.start}) before tensor {info.name!r} belong to no tensor; "
                f"{_RESAVE}"
            )
        covered, previous = info.end, info
    if covered != data_size:
        where = "after the last tensor" if tensors else "in a file with no tensors"
        raise AdapterError(f"{WEIGHTS_FILE}: {data_size - covered} data bytes {where} belong to no tensor; {_RESAVE}")


def _header_int(digits: str) -> int:
    # Python's ints are unbounded and slow to build from thousands of digits; the format's are u64.
    if len(digits.lstrip("-")) > _MAX_HEADER_INT_DIGITS:
        raise AdapterError(
            f"{WEIGHTS_FILE}: header holds a {len(digits)}-digit integer; safetensors sizes and offsets fit "
            "in 64 bits, not a safetensors file"
        )
    return int(digits)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a reader that kept the first would see another file.
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise AdapterError(f"{WEIGHTS_FILE}: header names {_shown(key)} twice; {_RESAVE}")
        found[key] = value
    return found


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


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
    paths = {key: module_path(*key) for key in sorted(pairs)}
    configured = spec.ranks_and_alphas(list(paths.values()))
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
        cfg_rank, alpha = configured[paths[layer, module]]
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


def module_path(layer: int, module: str) -> str:
    """The module's name inside the model, as PEFT matches pattern keys against it."""
    block = "self_attn" if module in ATTENTION_MODULES else "mlp"
    return f"model.layers.{layer}.{block}.{module}"


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


MAX_MANIFEST_BYTES = 4 * 1024 * 1024


def staged_manifest_load(path: str | Path, base: ModelDescriptor, *, max_lora_rank: int) -> AdapterManifest:
    """The manifest a worker wrote for a staged cache folder, checked against the weights header.

    The engine's way in: per-module ranks and scalings come from the manifest, so no pattern key
    of the upload is evaluated here; what is checked (shapes, names, ranks) costs one header read.
    """
    folder = Path(path)
    manifest_path, weights_path = folder / MANIFEST_FILE, folder / WEIGHTS_FILE
    if not manifest_path.is_file() or not weights_path.is_file():
        raise AdapterError(f"adapter folder {folder} is not a complete staged adapter (no {MANIFEST_FILE} or weights)")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise AdapterError(f"{manifest_path} is larger than {MAX_MANIFEST_BYTES} bytes; stage the adapter again")
    try:
        manifest = AdapterManifest.from_dict(json.loads(manifest_path.read_bytes(), parse_constant=_refuse_constant))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{manifest_path} is unreadable ({exc}); stage the adapter again") from None
    if manifest.base_fingerprint != base.fingerprint:
        raise AdapterError(
            f"adapter in {folder} was validated for base model {manifest.base_model!r}, not {base.name!r}; "
            "upload it for this base model"
        )
    size = weights_path.stat().st_size
    with weights_path.open("rb") as stream:
        tensors, _ = read_safetensors_header(stream, size)
    if not manifest.modules:
        raise AdapterError(f"{manifest_path} lists no modules; stage the adapter again")
    try:
        _check_manifest_modules(manifest, tensors, base, max_lora_rank=max_lora_rank, manifest_path=manifest_path)
    except TypeError:
        raise AdapterError(f"{manifest_path} has fields of the wrong type; stage the adapter again") from None
    manifest.bytes = size
    return manifest


def _check_manifest_modules(
    manifest: AdapterManifest, tensors: dict[str, TensorInfo], base: ModelDescriptor, *, max_lora_rank: int,
    manifest_path: Path,
) -> None:
    for m in manifest.modules:
        if not (_is_count(m.layer) and _is_count(m.rank) and isinstance(m.scaling, int | float)):
            raise TypeError(m)
        a, b = tensors.get(m.a_name), tensors.get(m.b_name)
        if m.module not in LORA_MODULES or not 0 <= m.layer < base.num_layers or a is None or b is None:
            raise AdapterError(f"{manifest_path} does not match its weights (layer {m.layer} {m.module}); stage it again")
        in_f, out_f = base.projection_shape(m.module)
        if (a.shape, b.shape) != ((m.rank, in_f), (out_f, m.rank)) or not 0 < m.rank <= max_lora_rank:
            raise AdapterError(
                f"layer {m.layer} {m.module}: rank {m.rank} with lora_A {list(a.shape)} / lora_B {list(b.shape)} "
                f"does not fit this engine (max_lora_rank {max_lora_rank}); stage the adapter again"
            )
        if not math.isfinite(m.scaling):  # its type was checked above
            raise AdapterError(f"{manifest_path}: layer {m.layer} {m.module} has scaling {m.scaling!r}; stage it again")


def adapter_manifest_load(path: str | Path, base: ModelDescriptor, *, max_lora_rank: int) -> AdapterManifest:
    """A staged folder's manifest when it has one (the serving path), else a PEFT folder validated here."""
    if (Path(path) / MANIFEST_FILE).is_file():
        return staged_manifest_load(path, base, max_lora_rank=max_lora_rank)
    return validate_adapter_dir(path, base, max_lora_rank=max_lora_rank)


def iter_nonfinite_tensors(path: str | Path, chunk_bytes: int = 1 << 22) -> Iterator[str]:
    """Names of tensors holding NaN or Inf, read in chunks so a large file never sits in memory.

    The header's tensors tile the data section, so the scan reads each byte of the file once.
    """
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
                if not raw:
                    raise AdapterError(f"{WEIGHTS_FILE} ended inside tensor {info.name!r}; upload the whole file")
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
