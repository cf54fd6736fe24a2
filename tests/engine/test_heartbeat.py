"""The heartbeat: written atomically (a reader never finds it missing) and bounded in size."""

from __future__ import annotations

import threading
import time

from engine_daemon import Engine, EngineConfig, protocol
from engine_daemon.service import (
    BEAT_ADAPTERS_MAX,
    BEAT_ADAPTERS_RECENT_SECONDS,
    EngineService,
    ServiceConfig,
    _beat_adapters,
)
from tests.engine.builders import write_tiny_model


def test_the_heartbeat_is_replaced_inside_one_transaction(tmp_path, redis_client, redis_url):
    """DEL then HSET of the hash happen between MULTI and EXEC, so no reader can find it missing between them."""
    model = write_tiny_model(tmp_path / "m")
    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32"))
    service = EngineService(engine, ServiceConfig(redis_url=redis_url, adapter_cache_dir=tmp_path, engine_id="beat"),
                            client=redis_client)
    service.start()
    key = protocol.heartbeat_key("beat")
    commands: list[str] = []
    listening = threading.Event()

    def monitor() -> None:
        with redis_client.__class__.from_url(redis_url).monitor() as feed:
            listening.set()
            for entry in feed.listen():
                commands.append(entry["command"])
                if entry["command"].startswith("ZADD"):  # the beat's next command, after the hash's three
                    return

    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    listening.wait(5)
    time.sleep(0.2)
    service._beat(force=True)
    thread.join(10)
    engine.close()
    delete = commands.index(f"DEL {key}")
    assert commands[delete - 1] == "MULTI" and commands[delete + 1].startswith(f"HSET {key}"), commands


def test_the_heartbeat_lists_resident_and_recent_adapters_only():
    now = time.time()
    rows = ([{"name": f"gpu{i}", "tier": "gpu", "last_used": now - 5000} for i in range(4)]
            + [{"name": f"old{i}", "tier": "disk", "last_used": now - BEAT_ADAPTERS_RECENT_SECONDS - 1} for i in range(500)]
            + [{"name": f"recent{i}", "tier": "disk", "last_used": now - i} for i in range(400)]
            + [{"name": "broken", "tier": "failed", "last_used": None}])
    shown = _beat_adapters(rows, now)
    names = [row["name"] for row in shown]
    assert len(shown) == BEAT_ADAPTERS_MAX
    assert {f"gpu{i}" for i in range(4)} | {"broken"} <= set(names)  # resident and failed always
    assert not any(name.startswith("old") for name in names)
    assert names[5:8] == ["recent0", "recent1", "recent2"]  # then the most recently used first
