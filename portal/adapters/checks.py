"""The checks on an upload's two files, with no Django: they run in the validation child process.

``adapter_files_check`` is everything the engine would refuse, refused before the version is
staged: no pickles, ``engine_daemon.peft_format``'s rules, then a streamed NaN/Inf scan.
"""

from __future__ import annotations

from pathlib import Path

from engine_daemon.peft_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterError,
    AdapterManifest,
    ModelDescriptor,
    iter_nonfinite_tensors,
    validate_adapter_dir,
)

MAX_CONFIG_BYTES = 1 << 20
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip container; a raw pickle's PROTO opcode


def pickle_error(name: str) -> AdapterError:
    return AdapterError(
        f"{name} is a pickle (PyTorch .bin/.pt), which can run code when loaded and is never read; "
        "save the adapter with save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
    )


def adapter_files_check(folder: Path, base: ModelDescriptor, *, max_lora_rank: int) -> AdapterManifest:
    """Everything the engine would refuse, refused now: peft_format's rules, then NaN/Inf (streamed)."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    with weights_path.open("rb") as stream:
        head = stream.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise pickle_error(WEIGHTS_FILE)
    config_bytes = config_path.stat().st_size
    if config_bytes > MAX_CONFIG_BYTES:
        raise AdapterError(f"{CONFIG_FILE} is {config_bytes} bytes; a PEFT adapter config is a few kilobytes of JSON")
    manifest = validate_adapter_dir(folder, base, max_lora_rank=max_lora_rank)
    nonfinite = list(iter_nonfinite_tensors(weights_path))
    if nonfinite:
        shown = ", ".join(nonfinite[:3]) + (f" and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else "")
        raise AdapterError(
            f"{WEIGHTS_FILE}: tensors hold NaN or Inf ({shown}); training diverged or the export is broken, "
            "retrain or re-export the adapter"
        )
    return manifest
