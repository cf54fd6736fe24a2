"""The validation child: a real process under real limits, each limit named when it is hit."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from engine_daemon.peft_format import AdapterError, adapter_content_sha256, describe_base_model
from portal.adapters.sandbox import ValidationJob, ValidationLimits, validate_in_child
from tests.engine.test_lora_patterns import SLOW_KEY
from tests.portal.peft_files import safetensors_bytes

ROOMY = ValidationLimits(memory_bytes=512 << 20, cpu_seconds=60, wall_seconds=120)
ARCHIVE_LIMITS = {"max_members": 32, "max_uncompressed_bytes": 1 << 30, "max_ratio": 100}


def job_for(folder: Path, dest: Path, **changes) -> ValidationJob:
    fields = dict(
        dest=str(dest),
        base=describe_base_model("random:tiny").to_dict(),
        max_lora_rank=64,
        archive_limits=ARCHIVE_LIMITS,
        config=str(folder / "adapter_config.json"),
        weights=str(folder / "adapter_model.safetensors"),
    )
    return ValidationJob(**(fields | changes))


def adapter_with(tmp_path: Path, peft_dir: Path, *, config_changes=None, weights: bytes | None = None) -> Path:
    folder = tmp_path / "upload"
    shutil.copytree(peft_dir, folder)
    if config_changes:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | config_changes))
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def test_a_good_adapter_is_checked_and_written_out(tmp_path, peft_dir):
    result = validate_in_child(job_for(peft_dir, tmp_path / "out"), ROOMY)
    out = tmp_path / "out"
    assert result.sha256 == adapter_content_sha256(out / "adapter_config.json", out / "adapter_model.safetensors")
    assert result.manifest.rank == 4 and {m.module for m in result.manifest.modules} == {"q_proj", "v_proj"}
    assert 0 < result.peak_rss_bytes < 150 << 20  # the interpreter, numpy and the checks


def test_the_checks_message_comes_back_as_it_is(tmp_path, peft_dir):
    folder = adapter_with(tmp_path, peft_dir, config_changes={"use_dora": True})
    with pytest.raises(AdapterError, match=r"DoRA \(use_dora\) is not supported"):
        validate_in_child(job_for(folder, tmp_path / "out"), ROOMY)


def test_memory_past_the_limit_is_named(tmp_path, peft_dir):
    """A valid file whose header carries 3.5 MB of metadata (under the 4 MiB header cap): reading it needs more
    than the 2 MiB allowed."""
    from safetensors.numpy import load_file, save

    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    weights = save(tensors, metadata={"format": "pt", "notes": "x" * (7 << 19)})
    folder = adapter_with(tmp_path, peft_dir, weights=weights)
    validate_in_child(job_for(folder, tmp_path / "roomy"), ROOMY)  # fine with room to spare
    with pytest.raises(AdapterError, match=r"validation needed more than 2 MiB \(LORAFLEET_VALIDATION_MAX_MEMORY_BYTES\)"):
        validate_in_child(job_for(folder, tmp_path / "out"), ValidationLimits(2 << 20, 60, 120))


def test_cpu_time_past_the_limit_is_named(tmp_path, peft_dir):
    """A pattern key that backtracks, with the matching budget lifted: the CPU limit stops the child."""
    folder = adapter_with(tmp_path, peft_dir, config_changes={"rank_pattern": {SLOW_KEY: 4}})
    started = time.monotonic()
    with pytest.raises(AdapterError, match=r"more than 1 s of CPU time \(LORAFLEET_VALIDATION_CPU_SECONDS\)"):
        validate_in_child(job_for(folder, tmp_path / "out", pattern_budget_seconds=600), ValidationLimits(256 << 20, 1, 120))
    assert time.monotonic() - started < 60


def test_the_wall_clock_is_named(tmp_path, peft_dir):
    folder = adapter_with(tmp_path, peft_dir, config_changes={"rank_pattern": {SLOW_KEY: 4}})
    started = time.monotonic()
    with pytest.raises(AdapterError, match=r"took longer than 1.5 s \(LORAFLEET_VALIDATION_WALL_SECONDS\)"):
        validate_in_child(job_for(folder, tmp_path / "out", pattern_budget_seconds=600), ValidationLimits(256 << 20, 60, 1.5))
    assert time.monotonic() - started < 10


def test_a_slow_pattern_key_is_refused_by_the_matching_budget(tmp_path, peft_dir):
    folder = adapter_with(tmp_path, peft_dir, config_changes={"rank_pattern": {SLOW_KEY: 4}})
    with pytest.raises(AdapterError, match="takes too long to match"):
        validate_in_child(job_for(folder, tmp_path / "out", pattern_budget_seconds=0.5), ROOMY)


def test_a_pickle_suffix_is_refused_before_reading(tmp_path, peft_dir):
    folder = adapter_with(tmp_path, peft_dir, weights=safetensors_bytes({}))
    with pytest.raises(AdapterError, match="adapter_model.bin is a pickle"):
        validate_in_child(job_for(folder, tmp_path / "out", weights_name="adapter_model.bin"), ROOMY)
