"""Hostile uploads aimed at the weights readers: each must be refused fast, in bounded memory, with its own words.

Most are the good adapter's own safetensors file with its header edited: ``_good_header`` splits
the file into (header, data) and ``_framed`` writes them back as safetensors does (u64 length,
JSON padded with spaces to 8 bytes, data).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

from engine_daemon.peft_format import MAX_HEADER_BYTES, MAX_TENSORS
from tests.portal.adapters.bad_uploads import BadUpload, Parts, Sources, _config, _weights, config_with, parts

FIRST = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

Header = dict | bytes  # an edited header: JSON to dump, or raw bytes as they go into the file


def _good_header(s: Sources) -> tuple[dict, bytes]:
    weights = _weights(s)
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length]), weights[8 + length :]


def _framed(header: Header, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def edited_header(edit: Callable[[dict, bytes], tuple[Header, bytes]]) -> Callable[[Sources], Parts]:
    """The good adapter with its weights' (header, data) passed through ``edit``."""

    def build(s: Sources) -> Parts:
        return parts(_config(s), _framed(*edit(*_good_header(s))))

    return build


def config_text(old: bytes, new: bytes) -> Callable[[Sources], Parts]:
    """The good adapter with ``old`` replaced in its config's text (for JSON that json.dumps would not write)."""

    def build(s: Sources) -> Parts:
        config = _config(s)
        assert old in config, old
        return parts(config.replace(old, new), _weights(s))

    return build


def _by_offset(header: dict) -> list[str]:
    return sorted((name for name in header if name != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])


def _huge_digit_shape(header: dict, data: bytes) -> tuple[Header, bytes]:
    header[FIRST]["shape"] = "SHAPE"
    digits = ", ".join(["1" + "0" * 5000] * 8)  # math.prod of these would run for hours
    return json.dumps(header).replace('"SHAPE"', f"[{digits}]").encode(), data


def _shape(shape: list[int]) -> Callable[[dict, bytes], tuple[Header, bytes]]:
    def edit(header: dict, data: bytes) -> tuple[Header, bytes]:
        header[FIRST]["shape"] = shape
        return header, data

    return edit


def _shifted(position: int, by: int) -> Callable[[dict, bytes], tuple[Header, bytes]]:
    """Move the tensor at ``position`` (in offset order) by ``by`` bytes, keeping its size."""

    def edit(header: dict, data: bytes) -> tuple[Header, bytes]:
        entry = header[_by_offset(header)[position]]
        entry["data_offsets"] = [offset + by for offset in entry["data_offsets"]]
        return header, data + b"\0" * max(by, 0)

    return edit


def _copies_of_first(count: int, *, name: str) -> Callable[[dict, bytes], tuple[Header, bytes]]:
    """``count`` more entries, all pointing at the first tensor's bytes (compact JSON, short names)."""

    def edit(header: dict, data: bytes) -> tuple[Header, bytes]:
        entry = header[FIRST]
        header.update({f"{name}{i}": entry for i in range(count)})
        return json.dumps(header, separators=(",", ":")).encode(), data

    return edit


def _metadata(value) -> Callable[[dict, bytes], tuple[Header, bytes]]:
    def edit(header: dict, data: bytes) -> tuple[Header, bytes]:
        header["__metadata__"] = value
        return header, data

    return edit


def _named_twice(header: dict, data: bytes) -> tuple[Header, bytes]:
    text = json.dumps(header)
    return ("{" + f"{json.dumps(FIRST)}: {json.dumps(header[FIRST])}, " + text[1:]).encode(), data


def _empty_lists(header: dict, data: bytes) -> tuple[Header, bytes]:
    """A header of the largest size read, of the JSON that costs the most memory to parse."""
    raw = b'{"t": [' + b",".join([b"[]"] * ((MAX_HEADER_BYTES - 16) // 3)) + b"]}"
    return raw, data


def _empty_tensor(header: dict, data: bytes) -> tuple[Header, bytes]:
    end = len(data)
    header["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = {
        "dtype": "F32", "shape": [0, 64], "data_offsets": [end, end]}
    return header, data


CASES: list[BadUpload] = [
    # numbers too large to compute with
    BadUpload(
        "safetensors-huge-digit-shape",
        edited_header(_huge_digit_shape),
        "header holds a 5001-digit integer; safetensors sizes and offsets fit in 64 bits",
    ),
    BadUpload("safetensors-dim-over-2-31", edited_header(_shape([2**31 + 1, 64])), "with a dimension above 2**31"),
    BadUpload("safetensors-too-many-dims", edited_header(_shape([1] * 9)), "has 9 dimensions, above 8"),
    BadUpload("safetensors-shape-larger-than-offsets", edited_header(_shape([2**31] * 8)), "offsets that do not match its shape"),
    # tensors that do not tile the data section
    BadUpload("safetensors-offsets-overlap", edited_header(_shifted(1, -4)), "overlap in the data section"),
    BadUpload(
        "safetensors-16k-entries-overlap", edited_header(_copies_of_first(16_000, name="t")), "overlap in the data section"
    ),
    BadUpload("safetensors-gap-between-tensors", edited_header(_shifted(-1, 4)), "before tensor"),
    BadUpload(
        "safetensors-data-past-last-tensor",
        lambda s: parts(_config(s), _weights(s) + b"\0" * 16),
        "16 data bytes after the last tensor belong to no tensor",
    ),
    BadUpload("safetensors-empty-tensor", edited_header(_empty_tensor), "is empty (shape [0, 64]); a LoRA weight never is"),
    # headers too large to parse, or not the format's JSON
    BadUpload(
        "safetensors-60k-entries", edited_header(_copies_of_first(60_000, name="t")), f"above the {MAX_TENSORS} allowed"
    ),
    BadUpload(
        "safetensors-500k-entries-header",
        edited_header(_copies_of_first(500_000, name="t")),
        f"bytes, more than the {MAX_HEADER_BYTES} read",
    ),
    BadUpload("safetensors-4mib-of-empty-lists", edited_header(_empty_lists), "malformed header entry for 't'"),
    BadUpload(
        "safetensors-metadata-list-not-strings",
        edited_header(_metadata(["pt"])),
        "__metadata__ must be a JSON object of strings to strings",
    ),
    BadUpload(
        "safetensors-metadata-int-not-strings",
        edited_header(_metadata({"format": "pt", "step": 3})),
        "__metadata__ must be a JSON object of strings to strings",
    ),
    BadUpload("safetensors-name-twice", edited_header(_named_twice), f"header names {FIRST!r} twice"),
    BadUpload(
        "safetensors-utf16-header",
        edited_header(lambda header, data: (json.dumps(header).encode("utf-16"), data)),
        "'utf-8' codec can't decode",
    ),
    BadUpload(
        "safetensors-deeply-nested-header",
        edited_header(lambda header, data: (b"[" * 100_000, data)),
        "maximum recursion depth exceeded",
    ),
    # adapter_config.json numbers
    BadUpload("config-alpha-1e999", config_text(b'"lora_alpha": 8', b'"lora_alpha": 1e999'), "lora_alpha is not finite (inf)"),
    BadUpload("config-alpha-true", config_with(lora_alpha=True), "lora_alpha must be a positive number, got True"),
    BadUpload(
        "config-alpha-pattern-inf",
        config_text(b'"alpha_pattern": {}', b'"alpha_pattern": {"q_proj": 1e999}'),
        "alpha_pattern['q_proj'] is not finite (inf)",
    ),
    BadUpload(
        "config-alpha-pattern-bool",
        config_with(alpha_pattern={"q_proj": True}),
        "alpha_pattern['q_proj'] must be a positive number, got True",
    ),
    BadUpload(
        "config-rank-pattern-huge", config_with(rank_pattern={"q_proj": 2**40}), "rank_pattern['q_proj'] is above 2**31"
    ),
]
