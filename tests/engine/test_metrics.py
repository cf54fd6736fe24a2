"""The daemon's Prometheus /metrics over HTTP: every family the ops issue names, with the engine's own numbers."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest

from engine_daemon import Engine, EngineConfig
from engine_daemon.metrics import EngineMetrics, metric_families, serve_metrics
from engine_daemon.service import EngineService, ServiceConfig
from tests.engine.builders import pool_bytes, write_adapter, write_tiny_model
from tests.engine.test_service import enqueue, finished, run_until, stage

SHORT = {"max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
FAMILIES = (
    "lorafleet:num_requests_running", "lorafleet:num_requests_waiting", "lorafleet:kv_cache_usage_perc",
    "lorafleet:time_to_first_token_seconds", "lorafleet:inter_token_latency_seconds",
    "lorafleet:e2e_request_latency_seconds", "lorafleet:prompt_tokens", "lorafleet:generation_tokens",
    "lorafleet:request_success", "lorafleet:memory_bytes", "lorafleet:step_seconds",
    "lorafleet:lora_adapters", "lorafleet:lora_adapter_capacity", "lorafleet:lora_adapter_loads",
    "lorafleet:lora_adapter_load_seconds", "lorafleet:lora_adapter_evictions", "lorafleet:lora_adapter_slot_hits",
    "lorafleet:lora_adapters_per_step", "lorafleet:num_preemptions", "lorafleet:prefix_cache_blocks",
    "lorafleet:prefix_cache_queries", "lorafleet:prefix_cache_hits", "lorafleet:prefix_cache_hit_rate",
    "lorafleet:lora_adapter_bytes", "lorafleet:lora_adapter_wait_seconds",
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("metrics-model"), with_tokenizer=True)


@pytest.fixture(scope="module")
def adapters(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics-adapters")
    return [write_adapter(model, folder / name, r=2, seed=seed) for seed, name in enumerate(("a", "b"), start=1)]


@pytest.fixture
def one_slot_service(model, adapters, redis_client, redis_url, tmp_path):
    """Device room for one adapter and one host-RAM place: every switch of adapter evicts and reloads from disk."""
    cache = tmp_path / "cache"
    cache.mkdir()
    engine = Engine(EngineConfig(model=str(model), device="cpu", dtype="float32", max_loras=1, max_cpu_loras=1,
                                 lora_pool_bytes=pool_bytes(model, [2])))
    service = EngineService(engine, ServiceConfig(redis_url=redis_url, adapter_cache_dir=cache, engine_id="metrics"),
                            client=redis_client)
    service.start()
    yield service, [stage(folder, cache) for folder in adapters]
    engine.close()


def serve(service: EngineService, redis_client, *shas: str | None) -> None:
    """One request per adapter, each to its end before the next starts."""
    for sha in shas:
        request = enqueue(redis_client, service.base_model, prompt="Ahoy", adapter_sha256=sha, sampling=SHORT)
        run_until(service, lambda request=request: finished(redis_client, request.request_id))


def samples(families, name: str, suffix: str = "", **labels) -> float:
    return sum(s.value for s in families[name].samples
               if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_served_over_http_carry_every_family_and_the_engine_numbers(one_slot_service, redis_client):
    service, (a, b) = one_slot_service
    url = serve_metrics(service, 0)
    families = metric_families(urllib.request.urlopen(url, timeout=10).read().decode())
    assert set(FAMILIES) <= set(families)  # every family exported before the first request
    assert samples(families, "lorafleet:lora_adapter_slot_hits", "_total") == 0

    serve(service, redis_client, a, b, a, a, None)
    families = metric_families(urllib.request.urlopen(url, timeout=10).read().decode())
    snap = service.engine.snapshot()
    rows = {row["name"]: row for row in snap.adapters}
    assert samples(families, "lorafleet:generation_tokens", "_total") == snap.generated_tokens == 15
    assert samples(families, "lorafleet:prompt_tokens", "_total") == snap.prompt_tokens
    assert samples(families, "lorafleet:request_success", "_total", finished_reason="length") == 5
    assert samples(families, "lorafleet:e2e_request_latency_seconds", "_count") == 5
    assert samples(families, "lorafleet:time_to_first_token_seconds", "_count") == 5
    assert samples(families, "lorafleet:inter_token_latency_seconds", "_count") == 10
    # a → b → a: two evictions and three loads from disk (one host place); the last a finds its slot.
    assert samples(families, "lorafleet:lora_adapter_loads", "_total", source="disk") == 3
    assert samples(families, "lorafleet:lora_adapter_load_seconds", "_count") == 3
    assert samples(families, "lorafleet:lora_adapter_evictions", "_total") == rows[a]["evictions"] + rows[b]["evictions"] == 2
    assert samples(families, "lorafleet:lora_adapter_slot_hits", "_total") == rows[a]["gpu_hits"] == 1
    assert samples(families, "lorafleet:lora_adapters", tier="gpu") == 1
    assert samples(families, "lorafleet:lora_adapters", tier="disk") == 1
    assert samples(families, "lorafleet:lora_adapter_capacity", tier="gpu") == 1
    assert samples(families, "lorafleet:lora_adapter_capacity", tier="host") == 1
    # The three requests that found their adapter off the device waited for it; the fourth did not.
    assert samples(families, "lorafleet:lora_adapter_wait_seconds", "_count") == 3
    assert samples(families, "lorafleet:lora_adapter_wait_seconds", "_sum") > 0
    pool = service.engine.residency.pool
    assert samples(families, "lorafleet:lora_adapter_bytes", tier="gpu") == 2 * pool.row_bytes == snap.adapter_bytes["gpu"]
    assert samples(families, "lorafleet:lora_adapter_bytes", tier="disk") == rows[a]["bytes"] + rows[b]["bytes"]
    assert samples(families, "lorafleet:lora_adapter_bytes", tier="host") == snap.adapter_bytes["host"] > 0
    assert snap.adapter_pool_rows == pool.capacity and snap.adapter_pool_rows_used == 2
    assert 0 < snap.adapter_loads_per_second <= 3 / 10  # the three loads, if all within the last 10 s
    for kind in ("weights", "kv_cache", "adapter_pool"):
        assert samples(families, "lorafleet:memory_bytes", kind=kind) == snap.memory[kind] > 0
    assert samples(families, "lorafleet:kv_cache_usage_perc") == 0  # every request ended: its blocks are free
    per_step = samples(families, "lorafleet:lora_adapters_per_step", "_count")
    assert per_step == snap.steps
    assert samples(families, "lorafleet:lora_adapters_per_step", "_sum") == snap.steps - 3  # the base request's 3 steps


def test_counters_never_run_backwards_when_an_adapter_is_removed(one_slot_service, redis_client):
    service, (a, b) = one_slot_service
    metrics = EngineMetrics(service)
    serve(service, redis_client, a, b)  # a evicted once
    service.engine.remove_adapter(a)  # its stats go with it
    service.engine.add_adapter(a, str(service.config.adapter_cache_dir / a))
    serve(service, redis_client, a)  # b evicted once
    families = metric_families(generate_latest(metrics.registry).decode())
    assert samples(families, "lorafleet:lora_adapter_evictions", "_total") == 2
    assert samples(families, "lorafleet:lora_adapter_loads", "_total") == 3


def test_the_prefix_cache_shows_its_blocks_hit_rate_and_tokens_per_tenant(one_slot_service, redis_client):
    service, _shas = one_slot_service
    metrics = EngineMetrics(service)
    prompt = "Ahoy matey, where be the treasure buried on this island of ours? " * 3
    for tenant in ("t1", "t1", "t2", "t1"):
        request = enqueue(redis_client, service.base_model, tenant_id=tenant, prompt=prompt, sampling=SHORT)
        run_until(service, lambda request=request: finished(redis_client, request.request_id))
    families = metric_families(generate_latest(metrics.registry).decode())
    snap = service.engine.snapshot()
    (t1_prompt, t1_cached), (t2_prompt, t2_cached) = snap.prefix_tenants["t1"], snap.prefix_tenants["t2"]
    assert t1_cached > 0 and t2_cached == 0 and t1_prompt == 3 * t2_prompt
    assert samples(families, "lorafleet:prefix_cache_queries", "_total", tenant="t1") == t1_prompt
    assert samples(families, "lorafleet:prefix_cache_hits", "_total", tenant="t1") == t1_cached
    assert samples(families, "lorafleet:prefix_cache_queries", "_total", tenant="t2") == t2_prompt
    # a tenant without a hit has its series at 0, so that hits / queries reads 0 rather than nothing
    assert any(s.labels.get("tenant") == "t2" for s in families["lorafleet:prefix_cache_hits"].samples)
    assert samples(families, "lorafleet:prefix_cache_blocks") == snap.prefix_cache_blocks > 0
    assert samples(families, "lorafleet:prefix_cache_hit_rate") == pytest.approx(
        t1_cached / (t1_prompt + t2_prompt)) == snap.prefix_hit_rate
    metrics.refresh()  # no new request: the counters stay where they are
    again = metric_families(generate_latest(metrics.registry).decode())
    assert samples(again, "lorafleet:prefix_cache_hits", "_total", tenant="t1") == t1_cached
