"""``python -m engine_daemon``: the engine daemon and its helpers.

    python -m engine_daemon serve --model smollm2-135m-instruct --device cpu --redis-url redis://127.0.0.1:6379/0
    python -m engine_daemon describe random:llama-3-8b      # the base-model descriptor, as JSON

The flags of ``serve`` are the settable fields of the config dataclasses (``engine_daemon/config.py``);
each can also come from the environment variable named in its help.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from engine_daemon.config import DaemonConfig, EngineConfig, ServiceConfig, Setting, settings

SERVE_CONFIGS = (EngineConfig, ServiceConfig, DaemonConfig)


def serve_settings() -> list[Setting]:
    """Every setting of ``serve``: one flag and one environment variable each."""
    return [s for config in SERVE_CONFIGS for s in settings(config)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine_daemon", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the engine daemon on Redis")
    for config in SERVE_CONFIGS:
        group = serve.add_argument_group(config.__name__, config.__doc__)
        for s in settings(config):
            group.add_argument(s.flag, dest=s.name, type=s.kind, default=_env_or_default(s), help=_help(s),
                               metavar=s.kind.__name__.upper())
    describe = commands.add_parser("describe", help="print a base model's architecture descriptor as JSON")
    describe.add_argument("model")
    return parser


def _env_or_default(s: Setting) -> object:
    # argparse converts a str default with the flag's type, so text from the environment is checked as a flag's is.
    return os.environ.get(s.env) or s.default


def _help(s: Setting) -> str:
    where = f"env {s.env}" if s.default in (None, "") else f"env {s.env}; default {s.default}"
    return f"{s.help} [{where}]".replace("%", "%%")


def configs_from(args: argparse.Namespace) -> tuple[EngineConfig, ServiceConfig, DaemonConfig]:
    engine, service, daemon = (config(**{s.name: getattr(args, s.name) for s in settings(config)})
                               for config in SERVE_CONFIGS)
    return engine, service, daemon


def serve(args: argparse.Namespace) -> None:
    import torch

    from engine_daemon.engine import Engine
    from engine_daemon.service import EngineService, install_signal_handlers

    engine_config, service_config, daemon = configs_from(args)
    logging.basicConfig(level=daemon.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if daemon.cpu_threads:
        torch.set_num_threads(daemon.cpu_threads)
    service = EngineService(Engine(engine_config), service_config)
    if daemon.metrics_port:
        from engine_daemon.metrics import serve_metrics

        service.metrics_url = serve_metrics(service, daemon.metrics_port, daemon.metrics_host)
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
