"""The safetensors header rules the portal relies on (engine_daemon.peft_format, shared with the engine)."""

import io
import json
import time

import numpy as np
import pytest

from engine_daemon.peft_format import (
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    AdapterError,
    iter_nonfinite_tensors,
    parse_adapter_config,
    read_safetensors_header,
)

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


# ---------------------------------------------------------------------------------------------
# The format's own rules, and bounds on what a hostile header costs


def framed(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def tensor(start: int, end: int, shape=None, dtype="F32") -> dict:
    return {"dtype": dtype, "shape": shape or [(end - start) // 4], "data_offsets": [start, end]}


def refused(blob: bytes, match: str) -> None:
    with pytest.raises(AdapterError, match=match):
        read_safetensors_header(io.BytesIO(blob), len(blob))


def test_a_shape_of_huge_integers_is_refused_before_any_arithmetic():
    digits = ", ".join(["1" + "0" * 5000] * 8)
    blob = framed(f'{{"{NAME}": {{"dtype": "F32", "shape": [{digits}], "data_offsets": [0, 16]}}}}'.encode(), b"\0" * 16)
    started = time.perf_counter()
    refused(blob, "5001-digit integer")
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ([2**31 + 1, 1], r"dimension above 2\*\*31"),
        ([1] * 9, "has 9 dimensions, above 8"),
        ([2**31] * 8, "offsets that do not match its shape"),  # the product stops at the file's size
        ([0, 64], r"is empty \(shape \[0, 64\]\)"),
    ],
)
def test_shapes_are_bounded_by_the_format_and_the_file(shape, match):
    end = 0 if 0 in shape else 16
    refused(framed({NAME: tensor(0, end, shape)}, b"\0" * end), match)


def test_the_dimension_bound_is_2_31_inclusive():
    refused(framed({NAME: tensor(0, 16, [2**31, 1])}, b"\0" * 16), "offsets that do not match")  # past the bound check


@pytest.mark.parametrize(
    ("tensors", "data", "match"),
    [
        ({"a": tensor(0, 8), "b": tensor(4, 12), "c": tensor(12, 16)}, 16, "'a' and 'b' overlap in the data section"),
        ({"a": tensor(0, 8), "b": tensor(0, 8)}, 8, "overlap in the data section"),
        ({"a": tensor(0, 8), "b": tensor(12, 16)}, 16, r"data bytes \[8, 12\) before tensor 'b' belong to no tensor"),
        ({"b": tensor(4, 16)}, 16, r"data bytes \[0, 4\) before tensor 'b'"),
        ({"a": tensor(0, 8)}, 16, "8 data bytes after the last tensor belong to no tensor"),
        ({}, 4, "4 data bytes in a file with no tensors"),
    ],
)
def test_tensors_must_tile_the_data_section(tensors, data, match):
    refused(framed(tensors, b"\0" * data), match + ".*re-save the adapter with safetensors' save_file")


def test_tensors_that_tile_parse_in_any_header_order():
    blob = framed({"b": tensor(8, 16), "a": tensor(0, 8)}, b"\0" * 16)
    tensors, _ = read_safetensors_header(io.BytesIO(blob), len(blob))
    assert [(t.name, t.start) for t in sorted(tensors.values(), key=lambda t: t.start)] == [("a", 0), ("b", 8)]


@pytest.mark.parametrize(
    ("entries", "match"), [(MAX_TENSORS, "overlap in the data section"), (60_000, f"above the {MAX_TENSORS} allowed")]
)
def test_many_entries_on_the_same_bytes_are_refused_fast(entries, match):
    header = {f"t{i}": tensor(0, 4) for i in range(entries)}
    blob = framed(json.dumps(header, separators=(",", ":")).encode(), b"\0" * 4)
    assert len(blob) < MAX_HEADER_BYTES
    started = time.perf_counter()
    refused(blob, match)
    assert time.perf_counter() - started < 3


def test_entry_count_and_header_size_are_capped():
    header = {f"t{i}": tensor(4 * i, 4 * i + 4) for i in range(MAX_TENSORS + 1)}  # tiles, but too many
    refused(framed(json.dumps(header, separators=(",", ":")).encode(), b"\0" * 4 * (MAX_TENSORS + 1)),
            f"lists {MAX_TENSORS + 1} tensors, above the {MAX_TENSORS} allowed")
    big = framed(b" " * (MAX_HEADER_BYTES + 8), b"")
    started = time.perf_counter()
    refused(big, f"more than the {MAX_HEADER_BYTES} read")
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize(
    "metadata", [["pt"], "pt", None, 3, {"format": "pt", "step": 3}, {"format": {"nested": "x"}}]
)
def test_metadata_must_map_strings_to_strings(metadata):
    refused(framed({"__metadata__": metadata, NAME: tensor(0, 16)}, b"\0" * 16), "__metadata__ must be a JSON object")


def test_string_metadata_is_kept_out_of_the_tensors():
    blob = framed({"__metadata__": {"format": "pt"}, NAME: tensor(0, 16)}, b"\0" * 16)
    tensors, _ = read_safetensors_header(io.BytesIO(blob), len(blob))
    assert list(tensors) == [NAME]


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (f'{{"{NAME}": {json.dumps(tensor(0, 16))}, "{NAME}": {json.dumps(tensor(0, 16))}}}', "names .* twice"),
        ("[" * 100_000, "maximum recursion depth"),
        ('{"a": 1}'.encode("utf-16"), "'utf-8' codec"),
        (json.dumps({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}), r"has dtype \['F32'\]"),
        (json.dumps({"x" * 2000: tensor(0, 16)}), "a tensor name is 2000 characters long"),
    ],
)
def test_headers_the_engine_would_read_otherwise_are_refused(header, match):
    refused(framed(header if isinstance(header, bytes) else header.encode(), b"\0" * 16), match)


def test_the_nan_scan_reads_each_tensor_once(tmp_path):
    path = tmp_path / "w.safetensors"
    values = np.arange(32, dtype="<f4")
    values[20] = np.nan
    path.write_bytes(framed({"a": tensor(0, 64), "b": tensor(64, 128)}, values.tobytes()))
    assert list(iter_nonfinite_tensors(path, chunk_bytes=16)) == ["b"]


# ---------------------------------------------------------------------------------------------
# adapter_config.json numbers


def config(**changes) -> str:
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    return json.dumps({**base, **changes})


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (config().replace('"lora_alpha": 8', '"lora_alpha": 1e999'), r"lora_alpha is not finite \(inf\)"),
        (config(lora_alpha=10**400), r"lora_alpha is not finite \(inf\)"),  # overflows float()
        (json.loads(config()) | {"lora_alpha": float("nan")}, r"lora_alpha is not finite \(nan\)"),  # a dict
        (config(lora_alpha=True), "lora_alpha must be a positive number, got True"),
        (config(lora_alpha=-1), "lora_alpha must be a positive number, got -1"),
        (config(lora_alpha=0.0), "lora_alpha must be a positive number, got 0.0"),
        (config(lora_alpha="8"), "lora_alpha must be a positive number, got '8'"),
        (
            config(alpha_pattern={"q_proj": 1e999}).replace("Infinity", "1e999"),
            r"alpha_pattern\['q_proj'\] is not finite \(inf\)",
        ),
        (config(alpha_pattern={"q_proj": True}), r"alpha_pattern\['q_proj'\] must be a positive number, got True"),
        (config(alpha_pattern={"q_proj": 0}), r"alpha_pattern\['q_proj'\] must be a positive number, got 0"),
        (config(rank_pattern={"q_proj": True}), r"rank_pattern\['q_proj'\] must be a positive integer, got True"),
        (config(rank_pattern={"q_proj": 2**31 + 1}), r"rank_pattern\['q_proj'\] is above 2\*\*31"),
        (config(rank_pattern={"q_proj": 2.0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    ],
)
def test_config_numbers_must_be_finite_and_positive(text, match):
    with pytest.raises(AdapterError, match=match):
        parse_adapter_config(text)


def test_config_numbers_in_range_are_kept():
    spec = parse_adapter_config(config(lora_alpha=16, alpha_pattern={"q_proj": 0.5}, rank_pattern={"v_proj": 2**31}))
    assert spec.lora_alpha == 16.0 and isinstance(spec.lora_alpha, float)
    assert spec.alpha_pattern == {"q_proj": 0.5} and spec.rank_pattern == {"v_proj": 2**31}
