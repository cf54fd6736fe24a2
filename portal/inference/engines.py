"""What the engine daemons say about themselves in Redis: live engines, and the base models they serve.

Discovery reads only the wire protocol's keys: the ``lf:engines`` sorted set (engine id → last
beat) and each engine's heartbeat hash, which expires when its daemon stops beating. Every
daemon also writes its base model's descriptor into ``lf:base-models`` when it starts; the portal
upserts ``BaseModel`` rows from there, so a model that a live daemon serves is always known here.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from engine_daemon import protocol
from engine_daemon.peft_format import ModelDescriptor
from engine_daemon.protocol import Heartbeat, ProtocolError
from portal.base_models.errors import BaseModelError
from portal.base_models.models import BaseModel
from portal.base_models.services import base_model_register

log = logging.getLogger(__name__)


async def engines_live(client: Any, *, base_model: str | None = None, now: float | None = None) -> list[Heartbeat]:
    """Engines whose heartbeat is fresh (younger than its TTL), optionally only those serving ``base_model``."""
    now = now if now is not None else time.time()
    oldest = now - protocol.HEARTBEAT_TTL_SECONDS
    ids = await client.zrangebyscore(protocol.ENGINES_KEY, oldest, "+inf")
    if not ids:
        return []
    pipe = client.pipeline(transaction=False)
    for engine_id in ids:
        pipe.hgetall(protocol.heartbeat_key(_text(engine_id)))
    beats = []
    for raw in await pipe.execute():
        if not raw:
            continue  # expired between the two reads
        try:
            beat = Heartbeat.from_redis(raw)
        except ProtocolError as exc:
            log.warning("ignoring a malformed heartbeat: %s", exc)
            continue
        if beat.updated >= oldest and (base_model is None or beat.base_model == base_model):
            beats.append(beat)
    return sorted(beats, key=lambda b: b.engine_id)


def engine_serving(beats: list[Heartbeat]) -> bool:
    """Whether one of these engines takes new requests (a draining engine finishes its work, takes none)."""
    return any(not beat.draining for beat in beats)


def base_models_sync(client: Any) -> list[BaseModel]:
    """Upsert a BaseModel for every descriptor the daemons registered (synchronous: Django ORM + sync Redis).

    Unchanged rows are not written. A descriptor that conflicts with a registered model (the same
    name, another architecture, adapters already validated against the old one) is logged and skipped.
    """
    synced = []
    for name, raw in client.hgetall(protocol.BASE_MODELS_KEY).items():
        try:
            data = json.loads(raw)
            descriptor = ModelDescriptor.from_dict(data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the malformed base model descriptor of %s: %s", _text(name), exc)
            continue
        existing = BaseModel.objects.filter(name=descriptor.name).first()
        if existing is not None and existing.is_active and existing.descriptor == descriptor.to_dict():
            synced.append(existing)
            continue
        try:
            synced.append(base_model_register(descriptor=descriptor))
        except BaseModelError as exc:
            log.warning("not registering base model %s from its engine: %s", descriptor.name, exc.message)
    return synced


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)
