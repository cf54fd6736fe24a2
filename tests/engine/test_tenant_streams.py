"""Fair share from the queue on: each tenant's own request stream, read in weighted round robin.

The daemon runs against a real Redis on the tiny model; what is asserted comes from the engine's
record of admission order (``Scheduler.admitted``), never from wall-clock times.
"""

from __future__ import annotations

import time
import uuid

import pytest

from engine_daemon import Engine, EngineConfig, protocol
from engine_daemon.protocol import DeltaEvent, InferenceRequest, UsageEvent, response_event_from_redis
from engine_daemon.service import EngineService, ServiceConfig
from tests.engine.builders import write_tiny_model

SHORT = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tenant-model"), with_tokenizer=True)


def make_service(chat_model, redis_client, redis_url, tmp_path, max_num_seqs=4) -> EngineService:
    engine = Engine(EngineConfig(model=str(chat_model), device="cpu", dtype="float32", max_num_seqs=max_num_seqs))
    service = EngineService(engine, ServiceConfig(redis_url=redis_url, adapter_cache_dir=tmp_path, engine_id="fair"),
                            client=redis_client)
    service.start()
    return service


def enqueue(redis_client, base_model: str, tenant: str, count: int, *, weight: float = 1.0, prompt="Ahoy") -> list[str]:
    pipe = redis_client.pipeline(transaction=True)
    ids = []
    for _ in range(count):
        request = InferenceRequest(request_id=uuid.uuid4().hex, tenant_id=tenant, base_model=base_model,
                                   prompt=prompt, sampling=SHORT, created=time.time())
        protocol.enqueue_request(pipe, request, weight=weight)
        ids.append(request.request_id)
    pipe.execute()
    return ids


def ended(redis_client, request_id: str) -> bool:
    events = [response_event_from_redis(f) for _, f in redis_client.xrange(protocol.response_stream(request_id))]
    return bool(events) and not isinstance(events[-1], DeltaEvent)


def run_until(service: EngineService, done, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        service.run_once()


def admitted_tenants(service: EngineService) -> list[str]:
    return [tenant for _request, tenant in service.engine.scheduler.admitted]


def test_a_tenant_with_one_request_is_not_behind_another_tenants_backlog(chat_model, redis_client, redis_url, tmp_path):
    service = make_service(chat_model, redis_client, redis_url, tmp_path)
    base = service.base_model
    flood = enqueue(redis_client, base, "a", 60)
    enqueue(redis_client, base, "b", 10)
    [single] = enqueue(redis_client, base, "c", 1)  # arrives last of all
    run_until(service, lambda: ended(redis_client, single))
    order = admitted_tenants(service)
    # C was admitted while most of A's backlog still waited (a single FIFO would put it after all 60).
    assert order.count("a") <= 12, order
    run_until(service, lambda: all(ended(redis_client, r) for r in flood))
    order = admitted_tenants(service)
    assert order.index("c") < 12 and max(i for i, t in enumerate(order) if t == "b") < len(order) - 30
    # Each request's usage event carries its place in that order, for whoever reads the usage stream.
    admissions = {UsageEvent.from_redis(f).request_id: UsageEvent.from_redis(f).admission
                  for _id, f in redis_client.xrange(protocol.USAGE_STREAM)}
    assert admissions[single] == order.index("c") and sorted(admissions.values()) == list(range(71))
    # Ended requests are deleted from their streams: Redis holds only work in flight.
    for tenant in "abc":
        assert redis_client.xlen(protocol.request_stream(base, tenant)) == 0
    service.engine.close()


def test_weights_share_the_reads_and_the_scheduler(chat_model, redis_client, redis_url, tmp_path):
    service = make_service(chat_model, redis_client, redis_url, tmp_path)
    base = service.base_model
    heavy = enqueue(redis_client, base, "heavy", 40, weight=3.0)
    light = enqueue(redis_client, base, "light", 40, weight=1.0)
    run_until(service, lambda: sum(ended(redis_client, r) for r in heavy + light) >= 32)
    first = admitted_tenants(service)[:32]
    assert first.count("heavy") >= 1.5 * first.count("light") > 0, first  # 3:1 in the limit; the first reads are level
    assert service.engine.scheduler.tenant_weight["heavy"] == 3.0
    service.engine.close()


def test_a_tenant_that_appears_later_is_read_at_once(chat_model, redis_client, redis_url, tmp_path):
    service = make_service(chat_model, redis_client, redis_url, tmp_path)
    assert service.tenant_streams == {}
    [late] = enqueue(redis_client, service.base_model, "newcomer", 1)
    run_until(service, lambda: ended(redis_client, late), timeout=30)
    assert protocol.request_stream(service.base_model, "newcomer") in service.tenant_streams
    service.engine.close()


def test_redis_memory_returns_after_a_thousand_large_prompts(chat_model, redis_client, redis_url, tmp_path):
    """1,000 requests of 100 KB prompts (each refused: past the tiny model's context), then the memory is back."""
    service = make_service(chat_model, redis_client, redis_url, tmp_path, max_num_seqs=64)
    before = redis_client.info("memory")["used_memory"]
    prompt = "Ahoy matey " * 9_300  # ~100 KB
    ids = []
    for _ in range(10):  # in batches, as clients would send them
        ids += enqueue(redis_client, service.base_model, "big", 100, prompt=prompt)
        run_until(service, lambda ids=ids: all(ended(redis_client, r) for r in ids))
    after = redis_client.info("memory")["used_memory"]
    # What stays is 1,000 small error events (they expire with RESPONSE_TTL_SECONDS) and stream bookkeeping.
    assert after - before < 5 << 20, (before, after)
    assert redis_client.xlen(protocol.request_stream(service.base_model, "big")) == 0
    service.engine.close()


def test_a_newcomer_is_read_even_when_the_read_ahead_is_full(chat_model, redis_client, redis_url, tmp_path):
    service = make_service(chat_model, redis_client, redis_url, tmp_path, max_num_seqs=2)
    base = service.base_model
    enqueue(redis_client, base, "a", 20)
    run_until(service, lambda: len(service.in_flight) >= 4)  # 2 x max_num_seqs: the read-ahead is full
    [single] = enqueue(redis_client, base, "c", 1)
    time.sleep(service.config.tenants_refresh_seconds)  # a busy daemon looks for new tenants this often
    service.run_once()
    assert single in service.in_flight  # read at once: nothing of tenant c was in flight
    run_until(service, lambda: ended(redis_client, single))
    order = admitted_tenants(service)
    assert order.index("c") <= 4, order  # and admitted by fair share (a sequence of a was preempted for it)
    service.engine.close()
