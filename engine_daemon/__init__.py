"""lorafleet's engine: one base model, many LoRA adapters, continuous batching.

The names below are loaded lazily so that the pure-Python parts of this package
(``protocol``, ``peft_format``, ``model_source``) import without torch, as the portal needs.
"""

from engine_daemon.peft_format import AdapterError

__all__ = ["AdapterError", "Engine", "EngineConfig", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name in ("Engine", "EngineConfig", "RequestOutput"):
        from engine_daemon import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from engine_daemon.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'engine_daemon' has no attribute {name!r}")
