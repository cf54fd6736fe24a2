"""The daemon's Redis side against a real Redis: requests, events, acks, control, recovery, heartbeat."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import fields

import pytest

from engine_daemon import Engine, EngineConfig, SamplingParams, protocol
from engine_daemon.engine import StepOutput
from engine_daemon.metrics import EngineMetrics, metric_families
from engine_daemon.peft_format import adapter_content_sha256
from engine_daemon.protocol import (
    ControlEvent,
    DeltaEvent,
    EngineSnapshot,
    Heartbeat,
    InferenceRequest,
    UsageEvent,
    response_event_from_redis,
)
from engine_daemon.service import EngineService, ServiceConfig
from tests.engine.builders import write_adapter, write_tiny_model

GREEDY = {"max_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("service-model"), with_tokenizer=True)


@pytest.fixture
def cache_dir(tmp_path):
    folder = tmp_path / "adapter-cache"
    folder.mkdir()
    return folder


def make_service(chat_model, redis_client, redis_url, cache_dir, **overrides) -> EngineService:
    engine = Engine(EngineConfig(model=str(chat_model), device="cpu", dtype="float32", max_loras=2))
    config = ServiceConfig(redis_url=redis_url, adapter_cache_dir=cache_dir, engine_id="test-engine", **overrides)
    service = EngineService(engine, config, client=redis_client)
    service.start()
    return service


def enqueue(redis_client, base_model: str, **fields) -> InferenceRequest:
    request = InferenceRequest(
        request_id=fields.pop("request_id", uuid.uuid4().hex),
        tenant_id=fields.pop("tenant_id", "t1"),
        base_model=base_model,
        sampling=fields.pop("sampling", GREEDY),
        created=time.time(),
        **fields,
    )
    pipe = redis_client.pipeline(transaction=True)
    protocol.enqueue_request(pipe, request)
    pipe.execute()
    return request


def events(redis_client, request_id: str):
    return [response_event_from_redis(f) for _, f in redis_client.xrange(protocol.response_stream(request_id))]


def run_until(service: EngineService, done, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        service.run_once()


def pending(redis_client, base_model: str, tenant: str = "t1") -> int:
    return redis_client.xpending(protocol.request_stream(base_model, tenant), protocol.CONSUMER_GROUP)["pending"]


def dead_daemon_reads(redis_client, stream: str, consumer: str) -> None:
    """A daemon that joins the stream's group (as each one does on seeing a tenant), reads one entry and dies."""
    try:
        redis_client.xgroup_create(stream, protocol.CONSUMER_GROUP, id="0", mkstream=True)
    except Exception as exc:  # noqa: BLE001
        assert "BUSYGROUP" in str(exc)
    redis_client.xreadgroup(protocol.CONSUMER_GROUP, consumer, {stream: ">"}, count=1)


def finished(redis_client, request_id: str) -> bool:
    found = events(redis_client, request_id)
    return bool(found) and not isinstance(found[-1], DeltaEvent)


def stage(adapter_dir, cache_dir) -> str:
    """What the Celery staging task does: copy into <cache>/<sha256>/."""
    sha = adapter_content_sha256(adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors")
    shutil.copytree(adapter_dir, cache_dir / sha)
    return sha


def test_a_request_streams_deltas_then_done_and_is_acked(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    request = enqueue(redis_client, service.base_model, messages=[{"role": "user", "content": "Ahoy"}])
    run_until(service, lambda: finished(redis_client, request.request_id))
    found = events(redis_client, request.request_id)
    deltas, done = found[:-1], found[-1]
    assert done.kind == "done" and done.finish_reason == "length" and done.completion_tokens == 12
    token_ids = [t for d in deltas for t in d.token_ids]
    offline = service.engine.chat([request.messages], SamplingParams(**GREEDY))[0]
    assert token_ids == offline.token_ids
    assert "".join(d.text for d in deltas) == offline.text
    assert done.prompt_tokens == len(offline.prompt_token_ids)
    assert pending(redis_client, service.base_model) == 0
    assert 0 < redis_client.ttl(protocol.response_stream(request.request_id)) <= protocol.RESPONSE_TTL_SECONDS


def test_adapter_requests_load_from_the_shared_cache(chat_model, redis_client, redis_url, cache_dir, tmp_path):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    sha = stage(write_adapter(chat_model, tmp_path / "a", r=4), cache_dir)
    with_adapter = enqueue(redis_client, service.base_model, prompt="Ahoy matey", adapter_sha256=sha)
    base = enqueue(redis_client, service.base_model, prompt="Ahoy matey")
    missing = enqueue(redis_client, service.base_model, prompt="Ahoy", adapter_sha256="0" * 64)
    run_until(service, lambda: all(finished(redis_client, r.request_id) for r in (with_adapter, base, missing)))
    tokens = {r.request_id: [t for e in events(redis_client, r.request_id)[:-1] for t in e.token_ids] for r in (with_adapter, base)}
    assert tokens[with_adapter.request_id] != tokens[base.request_id]
    error = events(redis_client, missing.request_id)[-1]
    assert error.kind == "error" and error.code == "adapter_unavailable"
    assert pending(redis_client, service.base_model) == 0


def test_staged_and_deleted_control_events_move_adapters(chat_model, redis_client, redis_url, cache_dir, tmp_path):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    sha = stage(write_adapter(chat_model, tmp_path / "a", r=4), cache_dir)
    redis_client.xadd(protocol.CONTROL_STREAM, ControlEvent(action="adapter-staged", sha256=sha).to_redis())
    run_until(service, lambda: service.engine.has_adapter(sha) and service.engine.residency.records[sha].host is not None)
    redis_client.xadd(protocol.CONTROL_STREAM, ControlEvent(action="adapter-deleted", sha256=sha).to_redis())
    run_until(service, lambda: not service.engine.has_adapter(sha))


def test_pins_from_the_portal_load_adapters_onto_the_device_and_keep_them(
        chat_model, redis_client, redis_url, cache_dir, tmp_path):
    early = stage(write_adapter(chat_model, tmp_path / "early", r=4, seed=1), cache_dir)
    later = stage(write_adapter(chat_model, tmp_path / "later", r=4, seed=2), cache_dir)
    redis_client.sadd(protocol.PINNED_ADAPTERS_KEY, early, "f" * 64)  # the second is staged nowhere here
    try:
        service = make_service(chat_model, redis_client, redis_url, cache_dir)
        residency = service.engine.residency
        assert residency.get(early).pinned and not service.engine.has_adapter("f" * 64)
        run_until(service, lambda: residency.ready(early))  # pinned before start: on the device at once
        redis_client.xadd(protocol.CONTROL_STREAM, ControlEvent(action="adapter-pinned", sha256=later).to_redis())
        run_until(service, lambda: service.engine.has_adapter(later) and residency.ready(later))
        assert residency.get(later).pinned
        redis_client.xadd(protocol.CONTROL_STREAM, ControlEvent(action="adapter-unpinned", sha256=early).to_redis())
        run_until(service, lambda: not residency.get(early).pinned)
        assert residency.get(later).pinned
        rows = {row["name"]: row for row in service.engine.snapshot().adapters}
        assert rows[later]["pinned"] and not rows[early]["pinned"]
    finally:
        redis_client.delete(protocol.PINNED_ADAPTERS_KEY)


def test_cancel_frees_the_kv_blocks_at_once(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    request = enqueue(redis_client, service.base_model, prompt="Ahoy", sampling={**GREEDY, "max_tokens": 500})
    run_until(service, lambda: len(events(redis_client, request.request_id)) >= 2)
    assert service.engine.kv.blocks.num_used > 0
    redis_client.xadd(protocol.CONTROL_STREAM, ControlEvent(action="cancel", request_id=request.request_id).to_redis())
    service.run_once()
    assert service.engine.kv.blocks.num_used == 0
    done = events(redis_client, request.request_id)[-1]
    assert done.finish_reason == "cancelled" and done.prompt_tokens > 0 and done.completion_tokens >= 1
    assert pending(redis_client, service.base_model) == 0


def test_a_cancel_that_arrives_before_the_request_is_honoured(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    redis_client.xadd(protocol.CONTROL_STREAM, ControlEvent(action="cancel", request_id="early").to_redis())
    service.run_once()
    enqueue(redis_client, service.base_model, request_id="early", prompt="Ahoy", sampling={**GREEDY, "max_tokens": 500})
    run_until(service, lambda: finished(redis_client, "early"))
    assert [e.kind for e in events(redis_client, "early")] == ["done"]
    assert events(redis_client, "early")[0].finish_reason == "cancelled"
    assert service.engine.kv.blocks.num_used == 0 and pending(redis_client, service.base_model) == 0


def test_deadlines_end_requests_with_an_error(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    late = enqueue(redis_client, service.base_model, prompt="Ahoy", deadline=time.time() - 1)
    soon = enqueue(redis_client, service.base_model, prompt="Ahoy", deadline=time.time() + 0.5,
                   sampling={**GREEDY, "max_tokens": 100000, "ignore_eos": True})
    run_until(service, lambda: finished(redis_client, late.request_id) and finished(redis_client, soon.request_id))
    for request in (late, soon):
        error = events(redis_client, request.request_id)[-1]
        assert error.kind == "error" and error.code == "deadline_exceeded"
    assert service.engine.kv.blocks.num_used == 0 and pending(redis_client, service.base_model) == 0


def test_bad_requests_get_errors_and_malformed_entries_are_dead_lettered(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    too_long = enqueue(redis_client, service.base_model, prompt="Ahoy " * 600)
    bad_params = enqueue(redis_client, service.base_model, prompt="Ahoy", sampling={"top_p": 0})
    typo = enqueue(redis_client, service.base_model, prompt="Ahoy", sampling={"max_tokens": 2, "temprature": 0.5})
    redis_client.xadd(protocol.request_stream(service.base_model, "t1"), {"v": "99", "type": "request", "body": "{}"})
    run_until(service, lambda: all(finished(redis_client, r.request_id) for r in (too_long, bad_params, typo)))
    assert events(redis_client, too_long.request_id)[-1].code == "context_length_exceeded"
    assert "top_p" in events(redis_client, bad_params.request_id)[-1].message
    error = events(redis_client, typo.request_id)[-1]
    assert error.code == "invalid_request" and "unknown sampling parameters ['temprature']" in error.message
    dead = redis_client.xrange(protocol.dead_letter_stream(service.base_model))
    assert len(dead) == 1 and b"protocol version" in dead[0][1][b"reason"]
    assert pending(redis_client, service.base_model) == 0


def test_a_failed_step_output_reaches_the_client_with_the_engine_code(chat_model, redis_client, redis_url, cache_dir,
                                                                    monkeypatch):
    """The code comes from the engine's StepOutput, whatever its message says."""
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    request = enqueue(redis_client, service.base_model, prompt="Ahoy")
    service._read_requests()
    assert request.request_id in service.in_flight
    failure = StepOutput(request.request_id, [], [], "", True, "error", "its weights hold NaN", 2, 0,
                         error_code="adapter_unavailable")
    monkeypatch.setattr(service.engine, "step", lambda: [failure])
    service.run_once()
    error = events(redis_client, request.request_id)[-1]
    assert (error.kind, error.code, error.message) == ("error", "adapter_unavailable", "its weights hold NaN")
    [(_id, fields)] = redis_client.xrevrange(protocol.USAGE_STREAM, count=1)
    usage = UsageEvent.from_redis(fields)
    assert (usage.request_id, usage.end, usage.error_code) == (request.request_id, "error", "adapter_unavailable")
    service.engine.abort(request.request_id)


def usage_events(redis_client) -> dict[str, UsageEvent]:
    return {(u := UsageEvent.from_redis(f)).request_id: u for _id, f in redis_client.xrange(protocol.USAGE_STREAM)}


LONG_PROMPT = "Ahoy matey, where be the treasure buried on this island of ours? " * 3


def test_a_repeated_prompt_reports_its_cached_tokens_in_done_usage_and_the_heartbeat(
        chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    block = service.engine.config.block_size
    served = []
    for tenant in ("t1", "t1", "t2"):  # one after the other: a block is cached once its K/V are written
        request = enqueue(redis_client, service.base_model, tenant_id=tenant, prompt=LONG_PROMPT)
        run_until(service, lambda request=request: finished(redis_client, request.request_id))
        served.append(request)
    first, again, other = (events(redis_client, r.request_id)[-1] for r in served)
    prompt = first.prompt_tokens
    cached = (prompt - 1) // block * block  # every full block but the one holding the last prompt token
    assert prompt > block and cached > 0
    assert (first.cached_tokens, again.cached_tokens, other.cached_tokens) == (0, cached, 0)  # t2 never sees t1's
    assert again.prompt_tokens == prompt  # cached tokens are still prompt tokens
    usage = usage_events(redis_client)
    assert [usage[r.request_id].cached_tokens for r in served] == [0, cached, 0]

    service._beat(force=True)
    beat = Heartbeat.from_redis(redis_client.hgetall(protocol.heartbeat_key("test-engine")))
    assert beat.prefix_caching and beat.prefix_cache_blocks == service.engine.kv.blocks.num_cached > 0
    assert beat.prefix_tenants == {"t1": [2 * prompt, cached], "t2": [prompt, 0]}
    assert (beat.prefix_prompt_tokens, beat.prefix_cached_tokens) == (3 * prompt, cached)
    assert beat.prefix_hit_rate == cached / (3 * prompt)


def test_a_cancelled_or_timed_out_request_bills_the_cached_part_of_its_prompt(
        chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    block = service.engine.config.block_size
    warm = enqueue(redis_client, service.base_model, prompt=LONG_PROMPT)
    run_until(service, lambda: finished(redis_client, warm.request_id))
    cached = (events(redis_client, warm.request_id)[-1].prompt_tokens - 1) // block * block

    cancelled = enqueue(redis_client, service.base_model, prompt=LONG_PROMPT, sampling={**GREEDY, "max_tokens": 500})
    run_until(service, lambda: len(events(redis_client, cancelled.request_id)) >= 2)
    redis_client.xadd(protocol.CONTROL_STREAM, ControlEvent(action="cancel", request_id=cancelled.request_id).to_redis())
    service.run_once()
    done = events(redis_client, cancelled.request_id)[-1]
    assert (done.finish_reason, done.cached_tokens) == ("cancelled", cached)

    late = enqueue(redis_client, service.base_model, prompt=LONG_PROMPT, deadline=time.time() + 0.5,
                   sampling={**GREEDY, "max_tokens": 100000})
    run_until(service, lambda: finished(redis_client, late.request_id))
    assert events(redis_client, late.request_id)[-1].code == "deadline_exceeded"

    usage = usage_events(redis_client)
    assert (usage[cancelled.request_id].end, usage[cancelled.request_id].cached_tokens) == ("cancelled", cached)
    assert (usage[late.request_id].end, usage[late.request_id].cached_tokens) == ("deadline", cached)
    assert usage[late.request_id].prompt_tokens == usage[cancelled.request_id].prompt_tokens > cached


def test_abandoned_request_is_claimed_and_resumed_after_the_sent_tokens(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir, claim_idle_seconds=0.2)
    request = enqueue(redis_client, service.base_model, prompt="Ahoy matey, the sea", sampling={**GREEDY, "max_tokens": 10})
    offline = service.engine.generate([request.prompt], SamplingParams(**request.sampling))[0]
    # A daemon that died after streaming three tokens: it read the entry and wrote three deltas.
    stream = protocol.request_stream(service.base_model, "t1")
    dead_daemon_reads(redis_client, stream, "dead-daemon")
    sent = offline.token_ids[:3]
    redis_client.xadd(protocol.response_stream(request.request_id), DeltaEvent("", sent).to_redis())
    time.sleep(0.3)
    run_until(service, lambda: finished(redis_client, request.request_id))
    found = events(redis_client, request.request_id)
    assert [t for e in found[:-1] for t in e.token_ids] == offline.token_ids  # every token exactly once
    assert found[-1].completion_tokens == 10
    assert pending(redis_client, service.base_model) == 0


def test_a_request_delivered_too_often_is_dead_lettered_with_an_error(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir, claim_idle_seconds=0.05, max_deliveries=2)
    request = enqueue(redis_client, service.base_model, prompt="Ahoy")
    stream = protocol.request_stream(service.base_model, "t1")
    dead_daemon_reads(redis_client, stream, "dead-1")
    time.sleep(0.1)
    entry = redis_client.xautoclaim(stream, protocol.CONSUMER_GROUP, "dead-2", 50, count=1)[1][0][0]
    time.sleep(0.1)
    service._last_claim = 0
    run_until(service, lambda: finished(redis_client, request.request_id))
    assert events(redis_client, request.request_id)[-1].code == "too_many_deliveries"
    dead = redis_client.xrange(protocol.dead_letter_stream(service.base_model))
    assert dead[0][1][b"entry_id"] == entry and b"delivered 3 times" in dead[0][1][b"reason"]
    assert pending(redis_client, service.base_model) == 0


def test_heartbeat_and_metrics_report_the_engine(chat_model, redis_client, redis_url, cache_dir, tmp_path):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    metrics = EngineMetrics(service)
    sha = stage(write_adapter(chat_model, tmp_path / "a", r=4), cache_dir)
    request = enqueue(redis_client, service.base_model, prompt="Ahoy", adapter_sha256=sha)
    run_until(service, lambda: finished(redis_client, request.request_id))
    service._beat(force=True)
    beat = Heartbeat.from_redis(redis_client.hgetall(protocol.heartbeat_key("test-engine")))
    snap = service.engine.snapshot()
    rates = {"tokens_per_second", "step_seconds", "lora_share"}  # over a window that moved on since the beat
    assert {f.name: getattr(beat, f.name) for f in fields(EngineSnapshot) if f.name not in rates} == {
        name: value for name, value in vars(snap).items() if name not in rates}
    assert beat.base_model == service.base_model and beat.device == "cpu"
    assert beat.dtype == beat.lora_dtype == "float32"
    assert beat.memory == snap.memory and beat.memory["weights"] > 0 and beat.memory["kv_cache"] > 0
    assert beat.kv_blocks_total == snap.kv_blocks_total and beat.generated_tokens == 12
    assert [(a["name"], a["tier"], a["requests"]) for a in beat.adapters] == [(sha, "gpu", 1)]
    assert redis_client.zscore(protocol.ENGINES_KEY, "test-engine") is not None
    assert 0 < redis_client.ttl(protocol.heartbeat_key("test-engine")) <= protocol.HEARTBEAT_TTL_SECONDS
    assert redis_client.xlen(protocol.series_stream("test-engine")) >= 1
    assert protocol.BASE_MODELS_KEY.encode() in redis_client.keys()

    from prometheus_client import generate_latest

    families = metric_families(generate_latest(metrics.registry).decode())
    for name in ("lorafleet:num_requests_running", "lorafleet:num_requests_waiting", "lorafleet:kv_cache_usage_perc",
                 "lorafleet:time_to_first_token_seconds", "lorafleet:inter_token_latency_seconds",
                 "lorafleet:e2e_request_latency_seconds", "lorafleet:prompt_tokens", "lorafleet:generation_tokens",
                 "lorafleet:lora_adapters", "lorafleet:lora_adapter_loads", "lorafleet:lora_adapter_load_seconds",
                 "lorafleet:lora_adapter_evictions"):
        assert name in families, name
    generated = [s for s in families["lorafleet:generation_tokens"].samples if s.name.endswith("_total")]
    assert generated[0].value == 12
    gpu = [s for s in families["lorafleet:lora_adapters"].samples if s.labels["tier"] == "gpu"]
    assert gpu[0].value == 1
    ttft = [s for s in families["lorafleet:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert ttft[0].value == 1


def daemon_command(model, redis_url, cache_dir, engine_id, *extra):
    return [sys.executable, "-m", "engine_daemon", "serve", "--model", str(model), "--device", "cpu",
            "--dtype", "float32", "--redis-url", redis_url, "--adapter-cache-dir", str(cache_dir),
            "--engine-id", engine_id, "--cpu-threads", "1", *extra]


@pytest.mark.slow
def test_kill_9_mid_stream_then_a_new_daemon_finishes_every_request(chat_model, redis_client, redis_url, cache_dir):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    base_model = chat_model.name
    requests = [enqueue(redis_client, base_model, prompt=f"Ahoy number {i}", sampling={**GREEDY, "max_tokens": 40})
                for i in range(20)]
    first = subprocess.Popen(daemon_command(chat_model, redis_url, cache_dir, "first"), env=env)
    try:
        deadline = time.monotonic() + 120
        while sum(bool(events(redis_client, r.request_id)) for r in requests) < 10:
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert pending(redis_client, base_model) > 0
    second = subprocess.Popen(daemon_command(chat_model, redis_url, cache_dir, "second", "--claim-idle-seconds", "1"),
                              env=env)
    try:
        deadline = time.monotonic() + 180
        while not all(finished(redis_client, r.request_id) for r in requests):
            assert time.monotonic() < deadline and second.poll() is None
            time.sleep(0.1)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    engine = Engine(EngineConfig(model=str(chat_model), device="cpu", dtype="float32"))
    offline = engine.generate([r.prompt for r in requests], SamplingParams(**GREEDY | {"max_tokens": 40}))
    for request, expected in zip(requests, offline, strict=True):
        found = events(redis_client, request.request_id)
        assert found[-1].kind == "done", found[-1]
        assert [t for e in found[:-1] for t in e.token_ids] == expected.token_ids
    assert pending(redis_client, base_model) == 0
    assert redis_client.exists(protocol.heartbeat_key("second")) == 0  # a clean exit removes its heartbeat


def test_sigterm_drains_running_requests_then_exits(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir, drain_seconds=30)
    request = enqueue(redis_client, service.base_model, prompt="Ahoy", sampling={**GREEDY, "max_tokens": 30})
    run_until(service, lambda: bool(events(redis_client, request.request_id)))
    waiting = enqueue(redis_client, service.base_model, prompt="later")
    service.request_stop()
    service.run()  # returns once drained
    assert finished(redis_client, request.request_id)
    assert events(redis_client, waiting.request_id) == []  # never taken: left for another daemon
    assert redis_client.xlen(protocol.request_stream(service.base_model, "t1")) == 1  # the ended one is deleted
    assert pending(redis_client, service.base_model) == 0


def test_sigterm_past_the_drain_time_hands_work_back_unacked(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir, drain_seconds=0)
    request = enqueue(redis_client, service.base_model, prompt="Ahoy", sampling={**GREEDY, "max_tokens": 500})
    run_until(service, lambda: bool(events(redis_client, request.request_id)))
    service.request_stop()
    service.run()
    assert not finished(redis_client, request.request_id)
    assert pending(redis_client, service.base_model) == 1  # another daemon will claim and resume it


def test_dead_letters_older_than_the_retention_are_trimmed(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir, dead_letter_retention_seconds=0.5)
    stream = protocol.request_stream(service.base_model, "t1")
    redis_client.hset(protocol.tenant_index(service.base_model), "t1", "1.0")
    dead = protocol.dead_letter_stream(service.base_model)
    redis_client.xadd(stream, {"v": "99", "type": "request", "body": "{}"})
    run_until(service, lambda: redis_client.xlen(dead) == 1)
    time.sleep(0.6)
    redis_client.xadd(stream, {"v": "99", "type": "request", "body": "{\"n\": 2}"})
    run_until(service, lambda: redis_client.xlen(stream) == 0)
    assert redis_client.xlen(dead) == 1  # the first one is past the retention: trimmed when the second came
    assert 0 < redis_client.ttl(dead) <= 1  # and the stream itself goes once no dead letter is left to keep


def test_n_choices_stream_by_index_with_logprobs_and_one_done(chat_model, redis_client, redis_url, cache_dir):
    service = make_service(chat_model, redis_client, redis_url, cache_dir)
    sampling = {"max_tokens": 6, "temperature": 1.0, "seed": 3, "ignore_eos": True, "n": 3, "logprobs": True,
                "top_logprobs": 2}
    request = enqueue(redis_client, service.base_model, prompt="Ahoy matey", sampling=sampling)
    run_until(service, lambda: finished(redis_client, request.request_id))
    found = events(redis_client, request.request_id)
    deltas, done = found[:-1], found[-1]
    offline = service.engine.generate([request.prompt], SamplingParams(**sampling))[0]
    for choice in offline.choices:
        mine = [d for d in deltas if d.index == choice.index]
        assert [t for d in mine for t in d.token_ids] == choice.token_ids
        assert [d.finish_reason for d in mine].count("length") == 1 and mine[-1].finish_reason == "length"
        entries = [entry for d in mine for entry in d.logprob_content]
        assert [entry["logprob"] for entry in entries] == pytest.approx(choice.logprobs, abs=1e-6)
        assert all(len(entry["top_logprobs"]) == 2 for entry in entries)
    assert done.finish_reasons == ["length"] * 3
    assert done.completion_tokens == 18 and done.prompt_tokens == len(offline.prompt_token_ids)
    usage = usage_events(redis_client)[request.request_id]
    assert usage.prompt_tokens == done.prompt_tokens and usage.completion_tokens == 18


def test_an_abandoned_request_with_n_choices_resumes_each_after_its_own_tokens(
    chat_model, redis_client, redis_url, cache_dir
):
    service = make_service(chat_model, redis_client, redis_url, cache_dir, claim_idle_seconds=0.2)
    sampling = {**GREEDY, "max_tokens": 8, "n": 3}
    request = enqueue(redis_client, service.base_model, prompt="Ahoy matey, the sea", sampling=sampling)
    offline = service.engine.generate([request.prompt], SamplingParams(**sampling))[0]
    dead_daemon_reads(redis_client, protocol.request_stream(service.base_model, "t1"), "dead-daemon")
    tokens = offline.token_ids
    response = protocol.response_stream(request.request_id)
    redis_client.xadd(response, DeltaEvent("", tokens, index=0, finish_reason="length").to_redis())
    redis_client.xadd(response, DeltaEvent("", tokens[:2], index=2).to_redis())
    time.sleep(0.3)
    run_until(service, lambda: finished(redis_client, request.request_id))
    found = events(redis_client, request.request_id)
    for index in range(3):
        assert [t for e in found[:-1] if e.index == index for t in e.token_ids] == tokens  # each token once
    assert found[-1].finish_reasons == ["length"] * 3 and found[-1].completion_tokens == 24
    assert usage_events(redis_client)[request.request_id].admission is not None  # choice 0 ran elsewhere


def test_a_guided_request_with_tools_in_the_prompt_answers_with_a_call(redis_client, redis_url, cache_dir, tmp_path):
    import json

    from engine_daemon import tool_calls

    # The generic tools block takes ~600 of this tokenizer's tokens: a longer context than the module's model.
    long_model = write_tiny_model(tmp_path / "long-model", with_tokenizer=True, max_position_embeddings=2048)
    service = make_service(long_model, redis_client, redis_url, cache_dir)
    tools = [{"type": "function", "function": {"name": "lookup", "description": "Find a word",
                                               "parameters": {"type": "object",
                                                              "properties": {"word": {"type": "string", "maxLength": 8}},
                                                              "required": ["word"], "additionalProperties": False}}}]
    schema = tool_calls.tool_call_schema(tools, {"type": "function", "function": {"name": "lookup"}})
    sampling = {"max_tokens": 80, "temperature": 1.0, "seed": 1, "guided_json": schema}
    messages = [{"role": "user", "content": "Look up 'sea'"}]
    request = enqueue(redis_client, service.base_model, messages=messages, tools=tools, sampling=sampling)
    run_until(service, lambda: finished(redis_client, request.request_id))
    found = events(redis_client, request.request_id)
    assert found[-1].kind == "done" and found[-1].finish_reason == "stop"
    call = json.loads("".join(e.text for e in found[:-1]))
    assert call["name"] == "lookup" and isinstance(call["arguments"]["word"], str)
    # The tools were in the prompt: it is longer than the same messages without them.
    assert found[-1].prompt_tokens > len(service.engine.encode(None, messages))
