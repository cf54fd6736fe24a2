"""The engine daemon's settings: one dataclass per part, each default written once, here.

A field that an operator may set carries its help in ``metadata`` (see ``setting``); the CLI
(``python -m engine_daemon serve``) makes of it the flag ``--max-loras`` and the environment
variable ``LORAFLEET_MAX_LORAS``. A field without help is tuning that only code and tests change.
Torch-free, so that ``serve --help`` and ``describe`` answer without loading torch.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "LORAFLEET_"


def setting(help: str, *, env: str = "") -> dict[str, str]:
    """A field's metadata: what ``--help`` says of it, and its environment variable if not LORAFLEET_<NAME>."""
    return {"help": help, "env": env}


def var_dir() -> Path:
    """Where the embedded defaults keep their state (the Redis socket, the adapter cache)."""
    return Path(os.environ.get("LORAFLEET_VAR_DIR") or "var").resolve()


@dataclass
class EngineConfig:
    """The engine: the model, where it runs, and how much it holds and batches."""

    model: str = field(default="smollm2-135m-instruct", metadata=setting(
        "base model: 'smollm2-135m-instruct' (bundled GGUF), 'random:<preset>', an HF directory or a .gguf file"))
    device: str = field(default="auto", metadata=setting("'auto', 'cpu', 'cuda' or 'cuda:N'"))
    dtype: str = field(default="auto", metadata=setting(
        "'auto' (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16"))
    # A half dtype halves the adapters' memory and what a decode step reads; sums stay in the model's dtype.
    lora_dtype: str = field(default="auto", metadata=setting(
        "adapter weights: 'auto' (the model's dtype, exact), or bfloat16/float16 (half the memory, rounded once)"))
    kernels: str = field(default="auto", metadata=setting(
        "LoRA and attention kernels: 'auto' (Triton on CUDA, native C on CPU where a compiler is at hand, "
        "else torch), 'triton', 'native' or 'torch'"))
    max_loras: int = field(default=8, metadata=setting("distinct adapters in one step"))
    lora_pool_bytes: int | None = field(default=None, metadata=setting(
        "bytes of device memory for resident adapters, each taking its own rank's share (default: on CUDA a "
        "tenth of the memory free after the weights, at least max-loras adapters of max-lora-rank; on CPU "
        "max-loras adapters of max-lora-rank)"))
    max_cpu_loras: int = field(default=64, metadata=setting("adapters kept in host RAM"))
    max_lora_rank: int = field(default=64, metadata=setting("largest LoRA rank accepted"))
    max_num_seqs: int = field(default=64, metadata=setting("sequences per step"))
    max_num_batched_tokens: int = field(default=2048, metadata=setting("tokens per step (decode + prefill chunks)"))
    max_model_len: int | None = field(default=None, metadata=setting("context length (default: the model's)"))
    block_size: int = field(default=16, metadata=setting("tokens per KV cache block"))
    enable_prefix_caching: bool = field(default=True, metadata=setting(
        "reuse the KV blocks of a prompt prefix this tenant sent before under the same adapter (0 turns it off)"))
    kv_cache_bytes: int | None = field(default=None, metadata=setting(
        "CPU: bytes for the KV cache (default: enough for max-num-seqs full contexts, at most 2 GiB)"))
    gpu_memory_utilization: float = field(default=0.90, metadata=setting("CUDA: share of device memory to fill"))
    seed: int = field(default=0, metadata=setting("seed of the engine's shared sampling generator"))


@dataclass
class ServiceConfig:
    """The daemon on Redis: where it reads and writes, and how it hands work over between daemons."""

    redis_url: str = field(default_factory=lambda: f"unix://{var_dir() / 'redis.sock'}", metadata=setting(
        "Redis to consume from (default: the embedded server's socket in LORAFLEET_VAR_DIR)", env="REDIS_URL"))
    adapter_cache_dir: Path = field(default_factory=lambda: var_dir() / "adapter-cache", metadata=setting(
        "the shared adapter cache written by the Celery workers", env="ADAPTER_CACHE_DIR"))
    engine_id: str = field(default="", metadata=setting("consumer name in the request group (default: host-pid)"))
    claim_idle_seconds: float = field(default=30.0, metadata=setting(
        "requests held this long by a silent daemon are taken over"))
    max_deliveries: int = field(default=3, metadata=setting(
        "deliveries before a request goes to the dead-letter stream"))
    dead_letter_retention_seconds: float = field(default=7 * 24 * 3600.0, metadata=setting(
        "dead letters older than this are trimmed from the dead-letter stream"))
    drain_seconds: float = field(default=30.0, metadata=setting("on SIGTERM, time allowed for running requests"))
    block_ms: int = 50  # how long an idle daemon waits for new requests per read
    heartbeat_seconds: float = 1.0
    tenants_refresh_seconds: float = 0.1  # how often a busy daemon reads the list of tenant streams again


@dataclass
class DaemonConfig:
    """The serve process around the service: logging, torch's threads, the Prometheus exporter."""

    cpu_threads: int | None = field(default=None, metadata=setting("CPU: torch threads (default: torch's choice)"))
    metrics_port: int = field(default=0, metadata=setting("serve Prometheus /metrics on this port (0 = off)"))
    metrics_host: str = field(default="127.0.0.1", metadata=setting("address for /metrics (0.0.0.0 in a container)"))
    log_level: str = field(default="INFO", metadata=setting("logging level"))


@dataclass(frozen=True)
class Setting:
    """One settable field of a config dataclass, as the CLI offers it."""

    name: str
    flag: str
    env: str
    kind: Any  # what the flag's text is converted with (a type, or `boolean`)
    default: Any  # None where the help says what the default is
    help: str


def settings(config: type) -> list[Setting]:
    """The settable fields of ``config``, in their order."""
    hints = typing.get_type_hints(config)
    return [
        Setting(f.name, "--" + f.name.replace("_", "-"), f.metadata["env"] or ENV_PREFIX + f.name.upper(),
                _value_type(hints[f.name]), _default(f), f.metadata["help"])
        for f in fields(config)
        if "help" in f.metadata
    ]


def _value_type(hint: Any) -> Any:
    """``int | None`` → int: an optional setting is left out, never given as null."""
    if isinstance(hint, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return kind
    return boolean if hint is bool else hint


def boolean(text: str) -> bool:
    """A yes/no setting's text (bool("0") would be True)."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default
