"""Adapters made by PEFT itself, and the archives and tampered files built from them."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

# Same shapes as engine_daemon's "random:tiny" preset.
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512
)


def make_peft_adapter(
    dest: Path,
    *,
    r: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    safe_serialization: bool = True,
    seed: int = 0,
    llama: dict[str, Any] | None = None,
    **lora_kwargs: Any,
) -> Path:
    """A LoRA adapter of a tiny random Llama, written by ``save_pretrained``; B is random too (not PEFT's zeros)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**(llama or TINY_LLAMA)))
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), **lora_kwargs)
    )
    with torch.no_grad():  # a trained adapter's B is not zero; make the content depend on the seed
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    peft_model.save_pretrained(str(dest), safe_serialization=safe_serialization)
    return dest


def zip_folder(folder: Path, target: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for path in sorted(folder.iterdir()):
            bundle.write(path, arcname=f"{prefix}{path.name}")
    return target


def tar_folder(folder: Path, target: Path, *, prefix: str = "") -> Path:
    with tarfile.open(target, "w:gz") as bundle:
        for path in sorted(folder.iterdir()):
            bundle.add(path, arcname=f"{prefix}{path.name}")
    return target


def zip_entries(target: Path, entries: list[tuple[str, bytes] | zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
        for entry in entries:
            if isinstance(entry, tuple):
                bundle.writestr(entry[0], entry[1])
            else:
                bundle.writestr(entry, b"")
    return target


def zip_symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix
    info.external_attr = (0o120777 << 16)
    return info


def tar_entries(target: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(target, "w:gz") as bundle:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
                bundle.addfile(info, io.BytesIO(data))
            else:
                bundle.addfile(info)
    return target


def tar_info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def edited_config(folder: Path, **changes: Any) -> bytes:
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    return json.dumps(config).encode()


_DELETE = object()
DELETE = _DELETE


def safetensors_bytes(tensors: dict[str, Any]) -> bytes:
    """numpy arrays → a safetensors file (for dtypes and names PEFT would not write)."""
    from safetensors.numpy import save

    return save(tensors)


def lora_tensors(*, r: int = 4, layers: int = 2, dtype: str = "float32", modules=("q_proj", "v_proj")) -> dict[str, Any]:
    """Valid-looking LoRA tensors for random:tiny, to tamper with."""
    import numpy as np

    shapes = {"q_proj": (64, 64), "v_proj": (64, 32), "k_proj": (64, 32), "o_proj": (64, 64)}
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(layers):
        for module in modules:
            in_f, out_f = shapes[module]
            base = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{base}.lora_A.weight"] = rng.standard_normal((r, in_f)).astype(dtype)
            tensors[f"{base}.lora_B.weight"] = rng.standard_normal((out_f, r)).astype(dtype)
    return tensors
