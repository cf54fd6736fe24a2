"""/ops/ rendered from the heartbeat of a real engine daemon, who may see it, and its empty and Redis-down states."""

from __future__ import annotations

import re
import time

import pytest
from django.test import Client

from engine_daemon import protocol
from engine_daemon.protocol import Heartbeat
from portal.ops.templatetags.ops_format import iec_bytes
from tests.portal.ops.fleet import ENGINE_ID, upload_rejected

pytestmark = pytest.mark.django_db


def field(html: str, name: str) -> str:
    return re.search(rf'data-field="{name}">([^<]*)<', html).group(1).strip()


def adapter_row(html: str, sha: str) -> dict[str, str]:
    """The row of one adapter: its tier and slot attributes, and every data-stat cell's text."""
    match = re.search(rf'<tr data-adapter="{sha}" data-tier="(\w+)" data-slot="(\d*)">(.*?)</tr>', html, re.S)
    assert match, f"no row for {sha}"
    cells = {name: re.sub(r"<[^>]+>", "", text).strip()
             for name, text in re.findall(r'data-stat="(\w+)">(.*?)</(?:td|span)>', match.group(3), re.S)}
    return {"tier_attr": match.group(1), "slot_attr": match.group(2), **cells}


def prefix_row(html: str, tenant_id: str) -> dict[str, str]:
    match = re.search(rf'<tr data-prefix-tenant="{tenant_id}">(.*?)</tr>', html, re.S)
    assert match, f"no prefix cache row for tenant {tenant_id}"
    return {name: re.sub(r"<[^>]+>", "", text).strip()
            for name, text in re.findall(r'data-stat="(\w+)">(.*?)</td>', match.group(1), re.S)}


def test_dashboard_shows_the_engine_numbers_and_every_tier(staff_client, fleet, redis_client, settings):
    base_model = fleet.service.base_model
    # Queues: a malformed entry the engine dead-letters, then two requests, one taken by a daemon that died.
    stream = fleet.enqueue_malformed()
    fleet.step_until(lambda: redis_client.xlen(protocol.dead_letter_stream(base_model)) == 1)
    fleet.enqueue(fleet.sha("pirate"))
    fleet.enqueue(None)
    redis_client.xreadgroup(protocol.CONSUMER_GROUP, "gone-daemon", {stream: ">"}, count=1)
    redis_client.rpush(settings.CELERY_TASK_DEFAULT_QUEUE, "task-1", "task-2")
    snap = fleet.beat()

    response = staff_client.get("/ops/")
    assert response.status_code == 200
    html = response.content.decode()

    assert f'data-engine="{ENGINE_ID}"' in html
    assert field(html, "base_model") == base_model and field(html, "device") == "cpu"
    assert 'data-memory="free"' not in html  # a CPU engine has no device memory to be free
    for kind in ("weights", "kv_cache", "adapter_pool"):
        shown = re.search(rf'data-memory="{kind}" data-bytes="(\d+)"', html).group(1)
        assert int(shown) == snap.memory[kind], kind
    assert snap.memory["weights"] > 0 and snap.memory["kv_cache"] > 0 and snap.memory["adapter_pool"] > 0
    assert f'data-kv-used="{snap.kv_blocks_used}" data-kv-total="{snap.kv_blocks_total}"' in html
    # The adapter pool: one rank-2 adapter's rows of room for one, the bytes per tier, loads, max_loras.
    assert field(html, "adapter_pool_rows_used") == str(snap.adapter_pool_rows_used) == "2"
    assert field(html, "adapter_pool_rows") == str(snap.adapter_pool_rows) and field(html, "max_loras") == "1"
    assert f'data-pool-rows-used="2" data-pool-rows="{snap.adapter_pool_rows}"' in html
    for tier in ("gpu", "host", "disk"):
        shown = re.search(rf'data-tier-bytes="{tier}">([^<]+)<', html).group(1)
        assert shown == iec_bytes(snap.adapter_bytes[tier]) and snap.adapter_bytes[tier] > 0, tier
    assert float(field(html, "adapter_loads_per_second")) == pytest.approx(snap.adapter_loads_per_second, abs=0.05)
    for name in ("running", "waiting", "steps", "generated_tokens", "preemptions", "max_adapters_in_step"):
        assert field(html, name) == str(getattr(snap, name)), name
    assert snap.generated_tokens == 12 and snap.max_adapters_in_step == 1
    # LoRA share of step time: measured on the steps that served an adapter (CPU times every step).
    shown_share = re.search(r'data-lora-share="([^"]*)"', html).group(1)
    if snap.lora_share is None:
        assert shown_share == "" and "no adapter served" in html
    else:
        assert 0 < snap.lora_share < 1 and float(shown_share) == pytest.approx(snap.lora_share)
    assert html.count('<path class="series"') + html.count("<circle") >= 1  # the charts have the samples
    # The prefix cache: on by default, its figures the engine's own (the fleet's tenant "t" is no tenant here).
    assert 'data-prefix-caching="on"' in html and snap.prefix_caching
    for name in ("prefix_cache_blocks", "prefix_prompt_tokens", "prefix_cached_tokens"):
        assert field(html, name) == str(getattr(snap, name)), name
    assert snap.prefix_prompt_tokens > 0 and snap.prefix_tenants.keys() == {"t"}
    assert prefix_row(html, "t")["tenant"] == "tenant t"

    rows = {row["name"]: row for row in snap.adapters}
    tiers = {"pirate": ("gpu", "0", "GPU rows 0–1"), "support-bot": ("disk", "", "disk only"),
             "shouty": ("host", "", "host RAM")}
    for name, (tier, slot, label) in tiers.items():
        sha = fleet.sha(name)
        shown, own = adapter_row(html, sha), rows[sha]
        assert (shown["tier_attr"], shown["slot_attr"], shown["tier"]) == (own["tier"], slot, label) == (tier, slot, label)
        for stat in ("requests", "gpu_hits", "host_hits", "disk_loads", "slot_loads", "evictions"):
            assert shown[stat] == str(own[stat]), (name, stat)
        assert shown["version"] == "@1"
        assert shown["tenant"] == ("tenant-b" if name == "shouty" else "tenant-a")
        assert (shown["mean_load_seconds"] == "–") == (own["mean_load_seconds"] is None)
    pirate = rows[fleet.sha("pirate")]
    assert adapter_row(html, fleet.sha("pirate"))["device_bytes"] == iec_bytes(pirate["device_bytes"])
    assert pirate["device_bytes"] == 2 * fleet.service.engine.residency.pool.row_bytes  # rank 2: two rows
    assert (rows[fleet.sha("pirate")]["requests"], rows[fleet.sha("pirate")]["evictions"]) == (2, 1)
    assert rows[fleet.sha("support-bot")]["evictions"] == 1 and rows[fleet.sha("shouty")]["requests"] == 0

    queue = re.search(rf'<tr data-queue="{re.escape(base_model)}">(.*?)</tr>', html, re.S).group(1)
    info = redis_client.xinfo_groups(stream)[0]
    assert re.search(rf'data-stat="length">{redis_client.xlen(stream)}<', queue)
    assert re.search(r'data-stat="undelivered">1<', queue) and re.search(r'data-stat="pending">1<', queue)
    assert info["pending"] == 1
    assert 'data-consumer="gone-daemon" data-pending="1"' in queue and "no heartbeat" in queue
    assert f'data-consumer="{ENGINE_ID}" data-pending="0"' in queue
    assert re.search(r'data-stat="dead_letters">1<', queue)
    assert re.search(r'data-stat="reason">malformed request: protocol version', html)
    assert re.search(r'data-stat="celery_length">2<', html)
    rejected = re.search(rf'<tr data-version="{fleet.rejected.pk}">(.*?)</tr>', html, re.S).group(1)
    assert "broken@1" in rejected and "not a safetensors file" in rejected


def test_residency_sorts_and_filters_by_tenant(staff_client, fleet):
    fleet.beat()
    live = staff_client.get("/ops/live/", {"tenant": "tenant-b"}).content.decode()
    assert re.findall(r'<tr data-adapter="(\w+)"', live) == [fleet.sha("shouty")]
    by_requests = staff_client.get("/ops/live/", {"sort": "-requests"}).content.decode()
    order = re.findall(r'<tr data-adapter="(\w+)"', by_requests)
    assert order[0] == fleet.sha("pirate") and order[-1] == fleet.sha("shouty")
    by_tier = staff_client.get("/ops/live/").content.decode()  # the device pool first, then host RAM, then disk
    assert re.findall(r'data-tier="(\w+)"', by_tier) == ["gpu", "host", "disk"]
    assert 'aria-sort="ascending"' in by_tier and "<html" not in by_tier  # a fragment, not a page


def test_only_staff_see_the_dashboard(client, tenant_a, db):
    for url in ("/ops/", "/ops/live/"):
        anonymous = client.get(url)
        assert anonymous.status_code == 302 and anonymous["Location"].startswith("/accounts/login/")
    member = Client()
    member.force_login(tenant_a[1])  # the tenant's owner, but not staff
    for url in ("/ops/", "/ops/live/"):
        response = member.get(url)
        assert response.status_code == 403 and b"for staff" in response.content
    assert b'href="/ops/"' not in member.get("/adapters/").content


def test_no_engine_alive(staff_client, redis_client, base_model):
    # An engine that stopped beating a minute ago (killed: its heartbeat expired, its entry is still listed).
    redis_client.zadd(protocol.ENGINES_KEY, {"old-engine": time.time() - 60})
    html = staff_client.get("/ops/").content.decode()
    assert 'id="no-engine"' in html and "No engine is alive" in html
    assert 'id="gone-engines"' in html and "old-engine" in html
    assert 'id="redis-unreachable"' not in html
    assert f'data-queue="{base_model.name}"' in html  # the registered model's queue, empty


def test_redis_unreachable(staff_client, settings, tenant_a, base_model, peft_dir, run_on_commit):
    upload_rejected(tenant_a[0], base_model, "bad", peft_dir, run_on_commit)
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    started = time.monotonic()
    response = staff_client.get("/ops/")
    assert response.status_code == 200 and time.monotonic() - started < 5
    html = response.content.decode()
    assert 'id="redis-unreachable"' in html and "127.0.0.1:1" in html
    assert 'id="no-engine"' not in html and html.count("Unknown while Redis is unreachable") == 3  # not "absent"
    assert "bad@1" in html  # the database's part still shows
    assert staff_client.get("/ops/live/").status_code == 200


def test_a_gpu_heartbeat_splits_device_memory_and_shows_every_tier_state(staff_client, redis_client):
    gib = 1 << 30
    now = time.time()
    beat = Heartbeat(
        engine_id="gpu-0", base_model="llama", device="cuda:0", dtype="bfloat16", started=now - 7200, updated=now,
        memory={"total": 140 * gib, "weights": 16 * gib, "kv_cache": 100 * gib, "adapter_pool": 2 * gib, "free": 12 * gib},
        kv_blocks_total=1000, kv_blocks_used=250, running=3, waiting=1,
        adapters=[
            {"name": "a" * 64, "tier": "failed", "error": "adapter weights hold NaN or Inf", "requests": 1,
             "retry_at": now + 40},
            {"name": "b" * 64, "tier": "loading", "requests": 2, "mean_load_seconds": 0.25},
        ],
    )
    redis_client.hset(protocol.heartbeat_key("gpu-0"), mapping=beat.to_redis())
    redis_client.hset(protocol.heartbeat_key("future"), mapping={**beat.to_redis(), "v": "2"})
    redis_client.zadd(protocol.ENGINES_KEY, {"gpu-0": now, "future": now})
    html = staff_client.get("/ops/").content.decode()
    memory = dict(re.findall(r'data-memory="(\w+)" data-bytes="(\d+)"', html))
    assert memory == {"weights": str(16 * gib), "kv_cache": str(100 * gib), "adapter_pool": str(2 * gib),
                      "other": str(10 * gib), "free": str(12 * gib)}
    assert "140 GiB on the device" in html and "2 h 0 min" in html
    assert 'data-field="lora_dtype"' not in html  # adapters stored in the model's dtype: nothing to add
    assert 'data-field="kernels"' not in html  # an engine from before the field: nothing shown
    beat.dtype, beat.lora_dtype, beat.kernels = "float32", "bfloat16", "native"
    redis_client.hset(protocol.heartbeat_key("gpu-0"), mapping=beat.to_redis())
    html = staff_client.get("/ops/").content.decode()
    assert 'float32, adapters in <span data-field="lora_dtype">bfloat16</span>' in html
    assert '<span data-field="kernels">native</span> kernels' in html
    assert "<strong>250</strong> of 1000 blocks in use (25.0%)" in html
    failed, loading = adapter_row(html, "a" * 64), adapter_row(html, "b" * 64)
    assert failed["tier"] == "failed" and "NaN or Inf" in html and loading["tier"] == "loading"
    assert failed["retry"] in ("in 39 s", "in 40 s")  # the engine's back-off before it loads again
    assert loading["mean_load_seconds"] == "250 ms" and html.count("unknown version") == 2
    assert "Engine <code>future</code> writes a heartbeat this portal cannot read" in html


def test_the_prefix_cache_hit_rate_shows_overall_and_per_tenant_by_name(staff_client, redis_client, tenant_a, tenant_b):
    now = time.time()
    a, b = str(tenant_a[0].pk), str(tenant_b[0].pk)
    beat = Heartbeat(
        engine_id="gpu-0", base_model="llama", device="cuda:0", dtype="bfloat16", started=now - 60, updated=now,
        prefix_caching=True, prefix_cache_blocks=37, prefix_prompt_tokens=1000, prefix_cached_tokens=250,
        prefix_tenants={b: [100, 0], a: [800, 240], "999999": [100, 10]},
    )
    redis_client.hset(protocol.heartbeat_key("gpu-0"), mapping=beat.to_redis())
    redis_client.zadd(protocol.ENGINES_KEY, {"gpu-0": now})
    html = staff_client.get("/ops/live/").content.decode()
    assert field(html, "prefix_hit_rate") == "25.0%" and field(html, "prefix_cache_blocks") == "37"
    assert (field(html, "prefix_cached_tokens"), field(html, "prefix_prompt_tokens")) == ("250", "1000")
    assert re.findall(r'<tr data-prefix-tenant="(\w+)">', html) == [a, b, "999999"]  # the most prompt tokens first
    assert prefix_row(html, a) == {"tenant": "tenant-a", "prompt_tokens": "800", "cached_tokens": "240",
                                   "hit_rate": "30.0%"}
    assert prefix_row(html, b)["tenant"] == "tenant-b" and prefix_row(html, b)["hit_rate"] == "0.0%"
    assert prefix_row(html, "999999")["tenant"] == "tenant 999999"  # gone from the database: its id

    beat.prefix_caching, beat.prefix_prompt_tokens, beat.prefix_cached_tokens, beat.prefix_tenants = False, 0, 0, {}
    redis_client.hset(protocol.heartbeat_key("gpu-0"), mapping=beat.to_redis())
    html = staff_client.get("/ops/live/").content.decode()
    assert 'data-prefix-caching="off"' in html and "--enable-prefix-caching 0" in html
    assert 'data-field="prefix_hit_rate"' not in html and "data-prefix-tenant" not in html


def test_no_prompt_yet_is_no_hit_rate_rather_than_zero(staff_client, redis_client):
    now = time.time()
    beat = Heartbeat(engine_id="idle", base_model="llama", device="cpu", dtype="float32", started=now, updated=now,
                     prefix_caching=True)
    redis_client.hset(protocol.heartbeat_key("idle"), mapping=beat.to_redis())
    redis_client.zadd(protocol.ENGINES_KEY, {"idle": now})
    html = staff_client.get("/ops/live/").content.decode()
    assert field(html, "prefix_hit_rate") == "–" and field(html, "prefix_cache_blocks") == "0"
