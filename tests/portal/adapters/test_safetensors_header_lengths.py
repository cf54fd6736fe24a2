"""A valid adapter is accepted whatever its safetensors header length, even when its first byte is a pickle's.

safetensors writes the header length as a little-endian u64 and pads the header with spaces to 8
bytes, so over 32 adapters the low byte of the length takes every multiple of 8; at 128 mod 256 the
file starts with 0x80, a pickle's PROTO opcode, and the upload checks must tell them apart by structure.
"""

import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from safetensors.numpy import load

from engine_daemon.peft_format import CONFIG_FILE, WEIGHTS_FILE, AdapterError, describe_base_model
from portal.adapters import services
from portal.adapters.checks import adapter_files_check, is_pickle
from portal.adapters.models import AdapterVersion
from portal.adapters.uploads import AdapterUpload

LOW_BYTES = [8 * k % 256 for k in range(1, 33)]  # 8, 16, ..., 248, 0 (a header of 256 mod 256)
TINY = describe_base_model("random:tiny")


def with_header_length(weights: bytes, low_byte: int) -> bytes:
    """The same tensors, with a header whose length is ``low_byte`` mod 256: __metadata__, then spaces."""
    (length,) = struct.unpack("<Q", weights[:8])
    header, data = json.loads(weights[8 : 8 + length]), weights[8 + length :]
    header["__metadata__"] = {"format": "pt", "note": "x" * (low_byte // 8)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((low_byte - len(raw)) % 256)
    return struct.pack("<Q", len(raw)) + raw + data


def adapter_folder(peft_dir: Path, dest: Path, low_byte: int) -> Path:
    dest.mkdir()
    shutil.copyfile(peft_dir / CONFIG_FILE, dest / CONFIG_FILE)
    (dest / WEIGHTS_FILE).write_bytes(with_header_length((peft_dir / WEIGHTS_FILE).read_bytes(), low_byte))
    return dest


@pytest.mark.parametrize("low_byte", LOW_BYTES)
def test_every_header_length_is_accepted(low_byte, peft_dir, tmp_path):
    folder = adapter_folder(peft_dir, tmp_path / "adapter", low_byte)
    weights = (folder / WEIGHTS_FILE).read_bytes()
    assert weights[0] == low_byte
    original = load((peft_dir / WEIGHTS_FILE).read_bytes())
    rewritten = load(weights)  # the safetensors library reads it as the same tensors
    assert rewritten.keys() == original.keys() and all(np.array_equal(rewritten[n], original[n]) for n in original)

    manifest = adapter_files_check(folder, TINY, max_lora_rank=64)

    assert manifest.rank == 4 and manifest.target_modules == ["q_proj", "v_proj"] and len(manifest.modules) == 4


def test_a_header_of_128_mod_256_starts_like_a_pickle_and_is_not_one(peft_dir, peft_pickled_dir, tmp_path):
    weights = adapter_folder(peft_dir, tmp_path / "adapter", 128) / WEIGHTS_FILE
    head = weights.read_bytes()[:2]
    assert head[0] == 0x80 and 2 <= head[1] <= 5, head  # PROTO 2..5, as pickle.dumps writes
    assert not is_pickle(weights)

    raw_pickle = tmp_path / "raw.safetensors"
    raw_pickle.write_bytes(pickle.dumps({"lora_A": [0.0] * 64}, protocol=4))
    assert is_pickle(raw_pickle) and is_pickle(peft_pickled_dir / "adapter_model.bin")  # torch.save's zip


def test_a_pickle_renamed_safetensors_is_still_called_a_pickle(peft_dir, tmp_path):
    folder = adapter_folder(peft_dir, tmp_path / "adapter", 128)
    (folder / WEIGHTS_FILE).write_bytes(pickle.dumps({"lora_A": [0.0] * 64}, protocol=2))
    with pytest.raises(AdapterError, match="adapter_model.safetensors is a pickle"):
        adapter_files_check(folder, TINY, max_lora_rank=64)


@pytest.mark.django_db
def test_an_upload_that_starts_with_0x80_becomes_ready(tenant_a, base_model, peft_dir, tmp_path, run_on_commit):
    folder = adapter_folder(peft_dir, tmp_path / "adapter", 128)
    upload = AdapterUpload(
        adapter_config=SimpleUploadedFile(CONFIG_FILE, (folder / CONFIG_FILE).read_bytes()),
        adapter_model=SimpleUploadedFile(WEIGHTS_FILE, (folder / WEIGHTS_FILE).read_bytes()),
    )
    with run_on_commit():
        version = services.adapter_create(tenant=tenant_a[0], name="starts-with-0x80", base_model=base_model, upload=upload)
    version.refresh_from_db()
    assert version.status == AdapterVersion.Status.READY, version.error
    assert version.manifest["rank"] == 4
