"""``python -m engine_daemon serve``: its flags and environment variables are the config dataclasses' fields."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from engine_daemon.__main__ import build_parser, configs_from, serve_settings
from engine_daemon.config import DaemonConfig, EngineConfig, ServiceConfig, settings

ROOT = Path(__file__).resolve().parents[2]

# The names docs, docker-compose.yml and portal/devstack.py already use: they must keep working.
PUBLISHED = {
    "--model": "LORAFLEET_MODEL", "--device": "LORAFLEET_DEVICE", "--dtype": "LORAFLEET_DTYPE",
    "--lora-dtype": "LORAFLEET_LORA_DTYPE", "--redis-url": "REDIS_URL", "--adapter-cache-dir": "ADAPTER_CACHE_DIR",
    "--engine-id": "LORAFLEET_ENGINE_ID", "--max-loras": "LORAFLEET_MAX_LORAS",
    "--max-cpu-loras": "LORAFLEET_MAX_CPU_LORAS", "--max-lora-rank": "LORAFLEET_MAX_LORA_RANK",
    "--max-num-seqs": "LORAFLEET_MAX_NUM_SEQS", "--max-num-batched-tokens": "LORAFLEET_MAX_NUM_BATCHED_TOKENS",
    "--max-model-len": "LORAFLEET_MAX_MODEL_LEN", "--kv-cache-bytes": "LORAFLEET_KV_CACHE_BYTES",
    "--gpu-memory-utilization": "LORAFLEET_GPU_MEMORY_UTILIZATION", "--cpu-threads": "LORAFLEET_CPU_THREADS",
    "--claim-idle-seconds": "LORAFLEET_CLAIM_IDLE_SECONDS", "--max-deliveries": "LORAFLEET_MAX_DELIVERIES",
    "--dead-letter-retention-seconds": "LORAFLEET_DEAD_LETTER_RETENTION_SECONDS",
    "--drain-seconds": "LORAFLEET_DRAIN_SECONDS", "--metrics-port": "LORAFLEET_METRICS_PORT",
    "--metrics-host": "LORAFLEET_METRICS_HOST", "--log-level": "LORAFLEET_LOG_LEVEL",
    "--enable-prefix-caching": "LORAFLEET_ENABLE_PREFIX_CACHING",
}


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch, tmp_path):
    for setting in serve_settings():
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.setenv("LORAFLEET_VAR_DIR", str(tmp_path))


def parse(*argv: str) -> tuple[EngineConfig, ServiceConfig, DaemonConfig]:
    return configs_from(build_parser().parse_args(["serve", *argv]))


def test_every_engine_field_is_a_flag_and_the_defaults_are_the_dataclasses():
    assert [s.name for s in settings(EngineConfig)] == [f.name for f in dataclasses.fields(EngineConfig)]
    assert parse() == (EngineConfig(), ServiceConfig(), DaemonConfig())
    assert ServiceConfig().redis_url.startswith("unix://") and ServiceConfig().redis_url.endswith("redis.sock")


def test_flags_and_environment_variables_keep_their_published_names():
    offered = {s.flag: s.env for s in serve_settings()}
    assert {flag: offered.get(flag) for flag in PUBLISHED} == PUBLISHED
    assert offered["--kernels"] == "LORAFLEET_KERNELS"


def test_kernels_reach_the_engine_config_from_the_flag_or_the_environment(monkeypatch):
    assert parse("--kernels", "torch")[0].kernels == "torch"
    monkeypatch.setenv("LORAFLEET_KERNELS", "native")
    assert parse()[0].kernels == "native"
    assert parse("--kernels", "triton")[0].kernels == "triton"  # a flag beats the environment


def test_prefix_caching_is_on_unless_a_flag_or_the_environment_says_0(monkeypatch, capsys):
    assert parse()[0].enable_prefix_caching is True
    assert parse("--enable-prefix-caching", "0")[0].enable_prefix_caching is False  # bool("0") would be True
    assert parse("--enable-prefix-caching", "yes")[0].enable_prefix_caching is True
    monkeypatch.setenv("LORAFLEET_ENABLE_PREFIX_CACHING", "off")
    assert parse()[0].enable_prefix_caching is False
    assert parse("--enable-prefix-caching", "1")[0].enable_prefix_caching is True  # a flag beats the environment
    monkeypatch.setenv("LORAFLEET_ENABLE_PREFIX_CACHING", "maybe")
    with pytest.raises(SystemExit):
        parse()
    assert "--enable-prefix-caching: invalid boolean value: 'maybe'" in capsys.readouterr().err


def test_environment_values_are_converted_and_checked_like_flags(monkeypatch, capsys):
    monkeypatch.setenv("LORAFLEET_MAX_LORAS", "3")
    monkeypatch.setenv("LORAFLEET_GPU_MEMORY_UTILIZATION", "0.5")
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/1")
    monkeypatch.setenv("ADAPTER_CACHE_DIR", "/srv/cache")
    monkeypatch.setenv("LORAFLEET_METRICS_PORT", "9400")
    monkeypatch.setenv("LORAFLEET_CPU_THREADS", "")  # empty: not set
    engine, service, daemon = parse("--max-model-len", "512")
    assert (engine.max_loras, engine.gpu_memory_utilization, engine.max_model_len) == (3, 0.5, 512)
    assert (service.redis_url, service.adapter_cache_dir) == ("redis://cache:6379/1", Path("/srv/cache"))
    assert (daemon.metrics_port, daemon.cpu_threads) == (9400, None)
    monkeypatch.setenv("LORAFLEET_MAX_LORAS", "many")
    with pytest.raises(SystemExit):
        parse()
    assert "--max-loras: invalid int value: 'many'" in capsys.readouterr().err


def test_the_readme_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [s.env for s in serve_settings() if f"`{s.env}`" not in readme]
    assert not missing, f"README.md's table of settings lacks {missing}"


def test_help_names_each_variable_and_needs_no_torch():
    script = "from engine_daemon.__main__ import build_parser; build_parser().parse_args(['serve', '-h'])"
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())  # as wrapped to any width
    assert "--kernels STR" in shown and "'native' or 'torch' [env LORAFLEET_KERNELS; default auto]" in shown
    assert "[env REDIS_URL; default unix://" in shown and "[env LORAFLEET_MAX_MODEL_LEN]" in shown
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported
