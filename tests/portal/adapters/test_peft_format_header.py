"""The safetensors header rules the portal relies on (engine_daemon.peft_format, shared with the engine)."""

import io
import json

import pytest

from engine_daemon.peft_format import AdapterError, read_safetensors_header

NAME = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def header_blob(entry: dict) -> bytes:
    raw = json.dumps({NAME: entry}).encode()
    return len(raw).to_bytes(8, "little") + raw + b"\0" * 1024


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [4.0, 64.0], "data_offsets": [0, 1024]},  # would pass every shape check after it
        {"dtype": "F32", "shape": [True, 64], "data_offsets": [0, 256]},
        {"dtype": "F32", "shape": [-4, -64], "data_offsets": [0, 1024]},
        {"dtype": "F32", "shape": [4, 64], "data_offsets": ["0", "1024"]},  # used to raise TypeError
        {"dtype": "F32", "shape": ["4", 64], "data_offsets": [0, 1024]},
    ],
)
def test_shapes_and_offsets_must_be_non_negative_integers(entry):
    blob = header_blob(entry)
    with pytest.raises(AdapterError, match="not non-negative integers"):
        read_safetensors_header(io.BytesIO(blob), len(blob))


def test_a_well_formed_header_still_parses():
    blob = header_blob({"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]})
    tensors, data_start = read_safetensors_header(io.BytesIO(blob), len(blob))
    assert tensors[NAME].shape == (4, 64) and data_start == len(blob) - 1024
