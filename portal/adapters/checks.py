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
    safetensors_header_json,
    validate_adapter_dir,
)

MAX_CONFIG_BYTES = 1 << 20
# torch.save's zip container; a raw pickle's PROTO opcode with protocol 2 to 5
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def pickle_error(name: str) -> AdapterError:
    return AdapterError(
        f"{name} is a pickle (PyTorch .bin/.pt), which can run code when loaded and is never read; "
        "save the adapter with save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
    )


def is_pickle(path: Path) -> bool:
    """A pickle by its signature, unless the file is framed as safetensors.

    The structure decides, not the first byte: safetensors starts with its header length as a
    little-endian u64 and pads the header to 8 bytes, so every header of 128 mod 256 bytes starts
    with 0x80, as a pickle does. A file whose length prefix fits it and whose header is a JSON
    object is safetensors; only a file that is not is named by its signature.
    """
    with path.open("rb") as stream:
        if not stream.read(4).startswith(_PICKLE_MAGIC):
            return False
        stream.seek(0)
        try:
            safetensors_header_json(stream, path.stat().st_size)
        except AdapterError:
            return True
    return False


def adapter_files_check(folder: Path, base: ModelDescriptor, *, max_lora_rank: int) -> AdapterManifest:
    """Everything the engine would refuse, refused now: peft_format's rules, then NaN/Inf (streamed)."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if is_pickle(weights_path):
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
