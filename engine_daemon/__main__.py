"""``python -m engine_daemon``: the engine daemon and its helpers.

    python -m engine_daemon serve --model smollm2-135m-instruct --device cpu --redis-url redis://127.0.0.1:6379/0
    python -m engine_daemon describe random:llama-3-8b      # the base-model descriptor, as JSON

Every flag of ``serve`` can also come from the environment variable named in its help.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _var_dir() -> Path:
    return Path(_env("LORAFLEET_VAR_DIR") or "var").resolve()


# (flag, environment variable, type, default, help)
SERVE_FLAGS: list[tuple[str, str, type, object, str]] = [
    ("--model", "LORAFLEET_MODEL", str, "smollm2-135m-instruct",
     "base model: 'smollm2-135m-instruct' (bundled GGUF), 'random:<preset>', an HF directory or a .gguf file"),
    ("--device", "LORAFLEET_DEVICE", str, "auto", "'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("--dtype", "LORAFLEET_DTYPE", str, "auto", "'auto' (bfloat16 on CUDA, float32 on CPU), float32, float16, bfloat16"),
    ("--lora-dtype", "LORAFLEET_LORA_DTYPE", str, "auto",
     "adapter weights: 'auto' (the model's dtype, exact), or bfloat16/float16 (half the memory, rounded once)"),
    ("--redis-url", "REDIS_URL", str, None, "Redis to consume from (default: the embedded server's socket in LORAFLEET_VAR_DIR)"),
    ("--adapter-cache-dir", "ADAPTER_CACHE_DIR", Path, None,
     "the shared adapter cache written by the Celery workers (default: LORAFLEET_VAR_DIR/adapter-cache)"),
    ("--engine-id", "LORAFLEET_ENGINE_ID", str, "", "consumer name in the request group (default: host-pid)"),
    ("--max-loras", "LORAFLEET_MAX_LORAS", int, 8, "adapter slots on the device = distinct adapters per step"),
    ("--max-cpu-loras", "LORAFLEET_MAX_CPU_LORAS", int, 64, "adapters kept in host RAM"),
    ("--max-lora-rank", "LORAFLEET_MAX_LORA_RANK", int, 64, "largest LoRA rank accepted"),
    ("--max-num-seqs", "LORAFLEET_MAX_NUM_SEQS", int, 64, "sequences per step"),
    ("--max-num-batched-tokens", "LORAFLEET_MAX_NUM_BATCHED_TOKENS", int, 2048, "tokens per step (decode + prefill chunks)"),
    ("--max-model-len", "LORAFLEET_MAX_MODEL_LEN", int, None, "context length (default: the model's)"),
    ("--kv-cache-bytes", "LORAFLEET_KV_CACHE_BYTES", int, None, "CPU: bytes for the KV cache"),
    ("--gpu-memory-utilization", "LORAFLEET_GPU_MEMORY_UTILIZATION", float, 0.90, "CUDA: share of device memory to fill"),
    ("--cpu-threads", "LORAFLEET_CPU_THREADS", int, None, "CPU: torch threads (default: torch's choice)"),
    ("--claim-idle-seconds", "LORAFLEET_CLAIM_IDLE_SECONDS", float, 30.0,
     "requests held this long by a silent daemon are taken over"),
    ("--max-deliveries", "LORAFLEET_MAX_DELIVERIES", int, 3, "deliveries before a request goes to the dead-letter stream"),
    ("--dead-letter-retention-seconds", "LORAFLEET_DEAD_LETTER_RETENTION_SECONDS", float, 7 * 24 * 3600.0,
     "dead letters older than this are trimmed from the dead-letter stream"),
    ("--drain-seconds", "LORAFLEET_DRAIN_SECONDS", float, 30.0, "on SIGTERM, time allowed for running requests"),
    ("--metrics-port", "LORAFLEET_METRICS_PORT", int, 0, "serve Prometheus /metrics on this port (0 = off)"),
    ("--metrics-host", "LORAFLEET_METRICS_HOST", str, "127.0.0.1", "address for /metrics (0.0.0.0 in a container)"),
    ("--log-level", "LORAFLEET_LOG_LEVEL", str, "INFO", "logging level"),
]


def _attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine_daemon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the engine daemon on Redis")
    for flag, env, kind, default, help_text in SERVE_FLAGS:
        value = os.environ.get(env)
        serve.add_argument(flag, type=kind, default=kind(value) if value not in (None, "") else default,
                           help=f"{help_text} [env {env}; default {default}]")
    describe = commands.add_parser("describe", help="print a base model's architecture descriptor as JSON")
    describe.add_argument("model")
    return parser


def serve(args: argparse.Namespace) -> None:
    import torch

    from engine_daemon.engine import Engine, EngineConfig
    from engine_daemon.service import EngineService, ServiceConfig, install_signal_handlers

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    config = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, lora_dtype=args.lora_dtype, max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_lora_rank, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        kv_cache_bytes=args.kv_cache_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
    )
    engine = Engine(config)
    service = EngineService(engine, ServiceConfig(
        redis_url=args.redis_url or f"unix://{_var_dir() / 'redis.sock'}",
        adapter_cache_dir=args.adapter_cache_dir or _var_dir() / "adapter-cache",
        engine_id=args.engine_id,
        claim_idle_seconds=args.claim_idle_seconds,
        max_deliveries=args.max_deliveries,
        dead_letter_retention_seconds=args.dead_letter_retention_seconds,
        drain_seconds=args.drain_seconds,
    ))
    if args.metrics_port:
        from engine_daemon.metrics import serve_metrics

        service.metrics_url = serve_metrics(service, args.metrics_port, args.metrics_host)
    install_signal_handlers(service)
    service.run()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "describe":
        from engine_daemon.peft_format import describe_base_model

        json.dump(describe_base_model(args.model).to_dict(), sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
