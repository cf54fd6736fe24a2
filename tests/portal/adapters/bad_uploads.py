"""A corpus of bad uploads, each with the words its rejection must contain.

Every case builds its files from a good PEFT adapter (``good``: the folder save_pretrained wrote)
and returns the multipart parts to send: ``{field: (filename, bytes)}``.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tests.portal.peft_files import (
    DELETE,
    edited_config,
    lora_tensors,
    safetensors_bytes,
    tar_entries,
    tar_info,
    zip_entries,
    zip_symlink_info,
)

Parts = dict[str, tuple[str, bytes]]


@dataclass(frozen=True)
class Sources:
    good: Path  # save_pretrained(..., safe_serialization=True)
    pickled: Path  # save_pretrained(..., safe_serialization=False)
    other_base: Path  # trained on a Llama of other shapes
    tmp: Path


@dataclass(frozen=True)
class BadUpload:
    id: str
    build: Callable[[Sources], Parts]
    expect: str
    settings: dict[str, Any] = field(default_factory=dict)


def _config(s: Sources) -> bytes:
    return (s.good / "adapter_config.json").read_bytes()


def _weights(s: Sources) -> bytes:
    return (s.good / "adapter_model.safetensors").read_bytes()


def parts(config: bytes, weights: bytes, *, weights_name: str = "adapter_model.safetensors") -> Parts:
    return {"adapter_config": ("adapter_config.json", config), "adapter_model": (weights_name, weights)}


def zipped(entries: list, name: str = "adapter.zip") -> Callable[[Sources], Parts]:
    """A zip holding the good adapter under ``my-adapter/`` plus/instead of ``entries`` (callables of Sources)."""

    def build(s: Sources) -> Parts:
        members = [e(s) if callable(e) else e for e in entries]
        path = zip_entries(s.tmp / name, members)
        return {"archive": (name, path.read_bytes())}

    return build


def good_files(s: Sources) -> list[tuple[str, bytes]]:
    return [("my-adapter/adapter_config.json", _config(s)), ("my-adapter/adapter_model.safetensors", _weights(s))]


def with_good(*extra) -> Callable[[Sources], Parts]:
    def build(s: Sources) -> Parts:
        members = good_files(s) + [e(s) if callable(e) else e for e in extra]
        return {"archive": ("adapter.zip", zip_entries(s.tmp / "adapter.zip", members).read_bytes())}

    return build


def tarred(entries: Callable[[Sources], list]) -> Callable[[Sources], Parts]:
    def build(s: Sources) -> Parts:
        return {"archive": ("adapter.tar.gz", tar_entries(s.tmp / "adapter.tar.gz", entries(s)).read_bytes())}

    return build


def config_with(**changes) -> Callable[[Sources], Parts]:
    return lambda s: parts(edited_config(s.good, **changes), _weights(s))


def weights_from(tensors: Callable[[], dict]) -> Callable[[Sources], Parts]:
    return lambda s: parts(_config(s), safetensors_bytes(tensors()))


def _nan_tensors() -> dict:
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][3, 1] = np.nan
    return tensors


def _layer5_tensors() -> dict:
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"] = np.zeros((4, 64), "float32")
    tensors["base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight"] = np.zeros((64, 4), "float32")
    return tensors


def _without(name: str) -> Callable[[], dict]:
    def tensors() -> dict:
        found = lora_tensors()
        del found[name]
        return found

    return tensors


def _plus(name: str, shape=(4,), dtype="float32") -> Callable[[], dict]:
    def tensors() -> dict:
        found = lora_tensors()
        found[name] = np.zeros(shape, dtype)
        return found

    return tensors


def _mixed_dtypes() -> dict:
    tensors = lora_tensors()
    for name in list(tensors)[:2]:
        tensors[name] = tensors[name].astype("float16")
    return tensors


def _bad_offsets(s: Sources) -> Parts:
    """A header whose offsets claim more bytes than the tensor's shape holds."""
    header = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
        "dtype": "F32", "shape": [4, 64], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    return parts(_config(s), len(raw).to_bytes(8, "little") + raw + b"\0" * 8)


def _pickled_folder_zip(s: Sources) -> Parts:
    members = [(f"my-adapter/{p.name}", p.read_bytes()) for p in sorted(s.pickled.iterdir())]
    return {"archive": ("adapter.zip", zip_entries(s.tmp / "adapter.zip", members).read_bytes())}


def _truncated_zip(s: Sources) -> Parts:
    whole = zip_entries(s.tmp / "whole.zip", good_files(s)).read_bytes()
    return {"archive": ("adapter.zip", whole[: len(whole) // 2])}


def _gzip_not_tar(s: Sources) -> Parts:
    return {"archive": ("adapter.tar.gz", gzip.compress(_config(s)))}


def _many_members(s: Sources) -> Parts:
    return with_good(*[(f"my-adapter/notes/{i}.txt", b"x") for i in range(40)])(s)


def _tar_with(info: tarfile.TarInfo, data: bytes | None = None) -> Callable[[Sources], list]:
    def entries(s: Sources) -> list:
        return [
            (tar_info("my-adapter/adapter_config.json"), _config(s)),
            (tar_info("my-adapter/adapter_model.safetensors"), _weights(s)),
            (info, data),
        ]

    return entries


def _zip_bytes_of(folder_members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in folder_members:
            bundle.writestr(name, data)
    return buffer.getvalue()


CORPUS: list[BadUpload] = [
    # pickles, however they arrive
    BadUpload("zip-of-bin-weights", _pickled_folder_zip, "adapter_model.bin is a pickle"),
    BadUpload(
        "parts-bin-weights",
        lambda s: parts(_config(s), (s.pickled / "adapter_model.bin").read_bytes(), weights_name="adapter_model.bin"),
        "adapter_model.bin is a pickle (PyTorch .bin/.pt)",
    ),
    BadUpload(
        "pickle-renamed-safetensors",
        lambda s: parts(_config(s), (s.pickled / "adapter_model.bin").read_bytes()),
        "adapter_model.safetensors is a pickle",
    ),
    BadUpload("extra-pt-in-archive", with_good(("my-adapter/optimizer.pt", b"\x80\x04K\x01.")), "optimizer.pt is a pickle"),
    # adapter_config.json
    BadUpload("config-not-json", lambda s: parts(b"{not json", _weights(s)), "adapter_config.json is not valid JSON"),
    BadUpload(
        "config-nan-constant",
        lambda s: parts(_config(s).replace(b'"lora_alpha": 8', b'"lora_alpha": NaN'), _weights(s)),
        "NaN is not allowed in strict JSON",
    ),
    BadUpload("config-prefix-tuning", config_with(peft_type="PREFIX_TUNING"), "only LORA adapters are served"),
    BadUpload("config-modules-to-save", config_with(modules_to_save=["lm_head"]), "modules_to_save"),
    BadUpload("config-dora", config_with(use_dora=True), "DoRA (use_dora) is not supported"),
    BadUpload("config-targets-lm-head", config_with(target_modules=["q_proj", "lm_head"]), "['lm_head'] are not served"),
    BadUpload("config-no-rank", config_with(r=DELETE), "r must be a positive integer"),
    BadUpload("config-rank-mismatch", config_with(r=8), "(r / rank_pattern) says 8"),
    # weights against the base model
    BadUpload("rank-over-engine-max", lambda s: parts(_config(s), _weights(s)), "above this engine's max_lora_rank 2",
              settings={"LORAFLEET_MAX_LORA_RANK": 2}),
    BadUpload(
        "trained-on-another-base",
        lambda s: parts((s.other_base / "adapter_config.json").read_bytes(),
                        (s.other_base / "adapter_model.safetensors").read_bytes()),
        "was it trained on another base model?",
    ),
    BadUpload("layer-out-of-range", weights_from(_layer5_tensors), "random:tiny has 2 layers"),
    BadUpload("dtype-float64", weights_from(lambda: lora_tensors(dtype="float64")), "has dtype F64"),
    BadUpload("nan-in-weights", weights_from(_nan_tensors), "hold NaN or Inf"),
    BadUpload("unknown-tensor", weights_from(_plus("base_model.model.model.norm.extra.weight")), "unknown tensor"),
    BadUpload(
        "lora-bias-tensor", weights_from(_plus("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias")), "is a bias"
    ),
    BadUpload(
        "missing-lora-b",
        weights_from(_without("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")),
        "has no lora_B tensor",
    ),
    BadUpload("mixed-dtypes", weights_from(_mixed_dtypes), "mixes dtypes"),
    BadUpload("not-safetensors", lambda s: parts(_config(s), b"\x10\x00" + b"garbage" * 10), "not a safetensors file"),
    BadUpload("safetensors-bad-offsets", _bad_offsets, "offsets that do not match"),
    # the archive itself
    BadUpload("not-an-archive", lambda s: {"archive": ("adapter.zip", b"just some text\n")}, "neither a .zip nor a .tar.gz"),
    BadUpload("truncated-zip", _truncated_zip, "no end record"),
    BadUpload("gzip-but-not-tar", _gzip_not_tar, "tar.gz archive is corrupt or truncated"),
    BadUpload("absolute-path", zipped([("/etc/adapter_config.json", b"{}")]), "has an absolute path"),
    BadUpload(
        "dotdot-path",
        tarred(lambda s: [(tar_info("../../adapter_config.json"), _config(s))]),
        "climbs out of the archive with '..'",
    ),
    BadUpload("zip-symlink", with_good(zip_symlink_info("my-adapter/link")), "is a symbolic link"),
    BadUpload("tar-symlink", tarred(_tar_with(tar_info("my-adapter/evil", tarfile.SYMTYPE, "/etc/passwd"))),
              "is a symbolic link"),
    BadUpload("tar-hardlink", tarred(_tar_with(tar_info("my-adapter/evil", tarfile.LNKTYPE, "/etc/passwd"))),
              "is a hard link"),
    BadUpload("tar-device", tarred(_tar_with(tar_info("my-adapter/dev", tarfile.CHRTYPE))), "special file"),
    BadUpload(
        "nested-archive",
        with_good(lambda s: ("my-adapter/inner.zip", _zip_bytes_of(good_files(s)))),
        "is itself an archive; nested archives are refused",
    ),
    BadUpload("too-many-members", _many_members, "more than 32 members"),
    BadUpload(
        "uncompressed-total-too-big",
        with_good(("my-adapter/padding.bin.txt", b"\0" * 300_000)),
        "expands to more than 200000 bytes",
        settings={"LORAFLEET_ARCHIVE_MAX_UNCOMPRESSED_BYTES": 200_000},
    ),
    BadUpload("decompression-bomb", with_good(("my-adapter/padding.txt", b"\0" * 5_000_000)), "compression ratio is past 100:1"),
    BadUpload("no-config-in-archive", zipped([("my-adapter/README.md", b"# hi")]), "holds no adapter_config.json"),
    BadUpload(
        "two-adapters-in-one-archive",
        with_good(lambda s: ("second/adapter_config.json", _config(s))),
        "holds 2 adapters",
    ),
    BadUpload(
        "weights-missing-in-archive",
        zipped([lambda s: ("my-adapter/adapter_config.json", _config(s))]),
        "adapter_model.safetensors is missing next to my-adapter/adapter_config.json",
    ),
]
