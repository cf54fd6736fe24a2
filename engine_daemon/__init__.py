"""lorafleet's engine: one base model, many LoRA adapters, continuous batching.

``Engine`` and ``RequestOutput`` are loaded lazily so that the pure-Python parts of this package
(``protocol``, ``config``, ``peft_format``, ``model_source``) import without torch, as the portal needs.
"""

from engine_daemon.config import EngineConfig
from engine_daemon.peft_format import AdapterError
from engine_daemon.protocol import SamplingParams

__all__ = ["AdapterError", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name in ("Engine", "RequestOutput"):
        from engine_daemon import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'engine_daemon' has no attribute {name!r}")
