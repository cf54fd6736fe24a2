"""Usage that is never lost and never free: the engine reports every end, the portal writes it once."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest

from engine_daemon import Engine, EngineConfig, protocol
from engine_daemon.protocol import (
    ControlEvent,
    DeltaEvent,
    InferenceRequest,
    UsageEvent,
    response_event_from_redis,
)
from engine_daemon.service import EngineService, ServiceConfig
from portal.usage.models import Usage
from portal.usage.services import usage_record, usage_record_from_engine, usage_stream_drain
from tests.engine.builders import write_tiny_model

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("usage-model"), with_tokenizer=True)


@pytest.fixture
def service(chat_model, redis_client, redis_url, tmp_path):
    engine = Engine(EngineConfig(model=str(chat_model), device="cpu", dtype="float32"))
    service = EngineService(engine, ServiceConfig(redis_url=redis_url, adapter_cache_dir=tmp_path, engine_id="usage"),
                            client=redis_client)
    service.start()
    yield service
    engine.close()


def enqueue(redis_client, service, tenant, prompt="Ahoy matey, where be the treasure buried on this island?",
            **sampling) -> InferenceRequest:
    request = InferenceRequest(request_id=uuid.uuid4().hex, tenant_id=str(tenant.pk), base_model=service.base_model,
                               prompt=prompt,
                               sampling={"max_tokens": 6, "temperature": 0.0, "ignore_eos": True, **sampling},
                               created=time.time())
    pipe = redis_client.pipeline(transaction=True)
    protocol.enqueue_request(pipe, request)
    pipe.execute()
    return request


def events(redis_client, request_id):
    return [response_event_from_redis(f) for _, f in redis_client.xrange(protocol.response_stream(request_id))]


def run_until(service, done, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline
        service.run_once()


def drain(redis_client) -> int:
    return usage_stream_drain(client=redis_client, consumer="test-writer")


def test_a_finished_request_is_written_from_the_engines_count_alone(service, redis_client, tenant_a):
    request = enqueue(redis_client, service, tenant_a[0])
    run_until(service, lambda: any(e.kind == "done" for e in events(redis_client, request.request_id)))
    done = events(redis_client, request.request_id)[-1]
    assert drain(redis_client) == 1  # no portal ever wrote this one: as if it was killed mid-stream
    usage = Usage.objects.get(request_id=request.request_id)
    assert (usage.status, usage.prompt_tokens, usage.completion_tokens) == ("ok", done.prompt_tokens, 6)
    assert usage.engine_reported and not usage.portal_reported and usage.tenant == tenant_a[0]
    assert redis_client.xlen(protocol.USAGE_STREAM) == 0  # written, then deleted
    assert drain(redis_client) == 0


def test_a_request_cancelled_after_its_prefill_pays_for_the_prompt(service, redis_client, tenant_a):
    request = enqueue(redis_client, service, tenant_a[0], max_tokens=200)
    run_until(service, lambda: any(isinstance(e, DeltaEvent) for e in events(redis_client, request.request_id)))
    redis_client.xadd(protocol.CONTROL_STREAM, ControlEvent(action=ControlEvent.CANCEL,
                                                            request_id=request.request_id).to_redis())
    run_until(service, lambda: events(redis_client, request.request_id)[-1].kind == "done")
    # The portal saw the client leave: it records "cancelled" with no token counts of its own.
    usage_record(tenant=tenant_a[0], request_id=request.request_id, model="random", status="cancelled",
                 created=datetime.now(tz=UTC), total_time=0.5)
    drain(redis_client)
    usage = Usage.objects.get(request_id=request.request_id)
    assert usage.status == "cancelled" and usage.prompt_tokens > 10 and usage.completion_tokens >= 1
    assert usage.engine_reported and usage.portal_reported and usage.total_time == 0.5


def test_a_prompt_sent_again_is_written_with_the_tokens_its_prefix_cache_held(service, redis_client, tenant_a,
                                                                             tenant_b):
    prompt = "Ahoy matey, where be the treasure buried on this island of ours? " * 3
    served = []
    for tenant in (tenant_a[0], tenant_a[0], tenant_b[0]):
        request = enqueue(redis_client, service, tenant, prompt=prompt)
        run_until(service, lambda request=request: any(e.kind == "done" for e in events(redis_client, request.request_id)))
        served.append(request)
    again = events(redis_client, served[1].request_id)[-1]
    assert again.cached_tokens > 0
    drain(redis_client)
    rows = [Usage.objects.get(request_id=r.request_id) for r in served]
    assert [row.cached_tokens for row in rows] == [0, again.cached_tokens, 0]  # tenant B never hits A's blocks
    assert rows[1].prompt_tokens == again.prompt_tokens > again.cached_tokens


def test_an_engine_refusal_is_an_error_row_of_no_tokens(service, redis_client, tenant_a):
    request = enqueue(redis_client, service, tenant_a[0], top_p=0)  # bad sampling: refused before any compute
    run_until(service, lambda: bool(events(redis_client, request.request_id)))
    drain(redis_client)
    usage = Usage.objects.get(request_id=request.request_id)
    assert (usage.status, usage.error_code, usage.prompt_tokens) == ("error", "invalid_request", 0)


def event(tenant, request_id="r-1", **changes) -> UsageEvent:
    fields = dict(request_id=request_id, tenant_id=str(tenant.pk), base_model="m", end="done", prompt_tokens=30,
                  completion_tokens=7, created=time.time())
    return UsageEvent(**(fields | changes))


def test_whichever_writes_first_the_row_ends_the_same(tenant_a):
    tenant = tenant_a[0]
    now = datetime.now(tz=UTC)
    usage_record(tenant=tenant, request_id="portal-first", model="bot", status="ok", created=now, total_time=2.0,
                 prompt_tokens=25, cached_tokens=8, completion_tokens=7, time_to_first_token=0.3)
    usage_record_from_engine(event=event(tenant, "portal-first", cached_tokens=16))
    usage_record_from_engine(event=event(tenant, "engine-first", cached_tokens=16))
    usage_record(tenant=tenant, request_id="engine-first", model="bot", status="ok", created=now, total_time=2.0,
                 prompt_tokens=25, cached_tokens=8, completion_tokens=7, time_to_first_token=0.3)
    for request_id in ("portal-first", "engine-first"):
        usage = Usage.objects.get(request_id=request_id)
        # the engine's counts (it tokenized: 30, where the portal only estimated), the portal's timings
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_time, usage.model) == (30, 7, 2.0, "bot")
        assert usage.cached_tokens == 16
        assert usage.engine_reported and usage.portal_reported
    # A portal whose engine's usage event never arrives keeps what the done event said.
    usage_record(tenant=tenant, request_id="portal-only", model="bot", status="ok", created=now, total_time=1.0,
                 prompt_tokens=30, cached_tokens=16, completion_tokens=7)
    assert Usage.objects.get(request_id="portal-only").cached_tokens == 16


def test_a_redelivered_event_changes_nothing(tenant_a):
    usage_record_from_engine(event=event(tenant_a[0]))
    usage_record_from_engine(event=event(tenant_a[0], prompt_tokens=999))
    assert Usage.objects.get(request_id="r-1").prompt_tokens == 30 and Usage.objects.count() == 1


def test_entries_of_a_writer_that_died_are_claimed(redis_client, tenant_a):
    redis_client.xgroup_create(protocol.USAGE_STREAM, protocol.USAGE_GROUP, id="0", mkstream=True)
    redis_client.xadd(protocol.USAGE_STREAM, event(tenant_a[0]).to_redis())
    redis_client.xreadgroup(protocol.USAGE_GROUP, "dead-writer", {protocol.USAGE_STREAM: ">"}, count=1)
    assert usage_stream_drain(client=redis_client, consumer="alive", claim_idle_ms=60_000) == 0  # not idle long yet
    time.sleep(0.05)
    assert usage_stream_drain(client=redis_client, consumer="alive", claim_idle_ms=10) == 1
    assert Usage.objects.filter(request_id="r-1").exists() and redis_client.xlen(protocol.USAGE_STREAM) == 0


def test_an_unreadable_event_is_dropped_not_retried_forever(redis_client, tenant_a):
    redis_client.xadd(protocol.USAGE_STREAM, {"v": "99", "type": "usage", "body": "{}"})
    redis_client.xadd(protocol.USAGE_STREAM, event(tenant_a[0]).to_redis())
    assert drain(redis_client) == 2 and Usage.objects.count() == 1 and redis_client.xlen(protocol.USAGE_STREAM) == 0
