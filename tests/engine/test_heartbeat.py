"""The heartbeat: written atomically (a reader never finds it missing) and bounded in size."""

from __future__ import annotations

import threading
import time

from engine_daemon import Engine, EngineConfig, SamplingParams, protocol
from engine_daemon.service import (
    BEAT_ADAPTERS_MAX,
    BEAT_ADAPTERS_RECENT_SECONDS,
    BEAT_PREFIX_TENANTS_MAX,
    EngineService,
    ServiceConfig,
    _beat_adapters,
    _beat_prefix_tenants,
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


def test_the_heartbeat_lists_the_prefix_cache_of_the_busiest_tenants_and_totals_them_all():
    tenants = {f"t{i}": [i * 10, i] for i in range(1, 201)}
    shown = _beat_prefix_tenants(tenants)
    assert len(shown) == BEAT_PREFIX_TENANTS_MAX
    assert set(shown) == {f"t{i}" for i in range(201 - BEAT_PREFIX_TENANTS_MAX, 201)}
    assert shown["t200"] == [2000, 200] and _beat_prefix_tenants({"a": [1, 0]}) == {"a": [1, 0]}


def test_the_beat_bounds_the_tenants_but_not_the_totals(tmp_path, redis_client, redis_url):
    model = write_tiny_model(tmp_path / "m")
    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32", max_num_seqs=2, block_size=4))
    service = EngineService(engine, ServiceConfig(redis_url=redis_url, adapter_cache_dir=tmp_path, engine_id="beat"),
                            client=redis_client)
    service.start()
    prompt, one = list(range(3, 12)), SamplingParams(max_tokens=1)  # 9 tokens: two full blocks to reuse
    for i in range(BEAT_PREFIX_TENANTS_MAX + 6):
        engine.generate([prompt, prompt], one, tenants=[f"t{i}", f"t{i}"] if i else ["busiest", "busiest"])
    engine.generate([prompt], one, tenants=["busiest"])
    service._beat(force=True)
    beat = protocol.Heartbeat.from_redis(redis_client.hgetall(protocol.heartbeat_key("beat")))
    engine.close()
    assert len(beat.prefix_tenants) == BEAT_PREFIX_TENANTS_MAX
    assert beat.prefix_tenants["busiest"][0] == 27 and beat.prefix_tenants["busiest"][1] >= 8  # the third found two blocks
    tenants = BEAT_PREFIX_TENANTS_MAX + 6
    assert beat.prefix_prompt_tokens == 9 * (2 * tenants + 1)
    assert beat.prefix_cached_tokens == sum(c for _p, c in engine.scheduler.prefix_tokens.values()) > 0
