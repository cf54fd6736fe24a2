"""A tenant's limits count all its keys together; a key's own limits apply on top; the in-flight cap counts
the tenant's queued and running requests. Past any of them: a 429 with Retry-After naming the limit, and
nothing enqueued."""

from __future__ import annotations

import asyncio
import threading

import pytest

from portal.inference.errors import InferenceError
from portal.inference.ratelimits import in_flight_key
from portal.inference.services import (
    async_redis,
    inference_tokens_reserve,
    inference_tokens_settle,
)
from portal.usage.models import Usage
from tests.portal import factories
from tests.portal.inference.conftest import asgi_client, run
from tests.portal.inference.fake_engine import words

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "random:tiny", "messages": [{"role": "user", "content": "Ahoy"}]}


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def post(headers: dict, body: dict = CHAT):
    async def main():
        async with asgi_client() as client:
            return await client.post("/v1/chat/completions", json=body, headers=headers)

    return run(main)


def queued(redis_client) -> int:
    """Entries in all the request streams, however they are named (the engine reads without deleting here)."""
    return sum(redis_client.xlen(name) for name in redis_client.scan_iter("lf:req:*")
               if redis_client.type(name) == b"stream")


def assert_429(response, code: str) -> str:
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"].isdigit() and int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (code, "rate_limit_error")
    return error["message"]


@pytest.fixture
def two_keys(tenant):
    return factories.api_key_for(tenant, name="one"), factories.api_key_for(tenant, name="two")


def test_the_tenants_requests_per_minute_count_both_its_keys(engine, tenant, two_keys, redis_client):
    tenant.requests_per_minute = 3
    tenant.save()
    (_one, first), (_two, second) = two_keys
    assert [post(bearer(s)).status_code for s in (first, second, first)] == [200, 200, 200]
    before = queued(redis_client)
    response = post(bearer(second))
    message = assert_429(response, "rate_limit_exceeded")
    assert message.startswith("tenant acme is at its limit of 3 requests per minute (all keys together); retry after ")
    assert message.endswith(f"retry after {response.headers['Retry-After']} s")
    assert 1 <= int(response.headers["Retry-After"]) <= 20  # one request every 20 s
    assert queued(redis_client) == before == 3 and len(engine.requests) == 3

    other = factories.tenant_with_member("other-co", username="olga")[0]  # another tenant is not held back
    assert post(bearer(factories.api_key_for(other)[1])).status_code == 200


def test_a_keys_own_lower_limit_applies_on_top(engine, tenant, two_keys, redis_client):
    (one, first), (_two, second) = two_keys
    one.requests_per_minute = 1
    one.save()
    assert post(bearer(first)).status_code == 200
    message = assert_429(post(bearer(first)), "rate_limit_exceeded")
    assert message.startswith("this key is at its limit of 1 requests per minute; retry after ")
    assert [post(bearer(second)).status_code for _ in range(3)] == [200] * 3  # the tenant's 600 still apply
    assert queued(redis_client) == 4


def test_tokens_per_minute_count_both_keys_and_a_keys_own_limit(tenant, two_keys, redis_client):
    tenant.tokens_per_minute = 1000
    tenant.save()
    (one, _first), (two, _second) = two_keys
    two.tokens_per_minute = 300
    two.save()

    async def main():
        client = async_redis()
        reserved = await inference_tokens_reserve(client, key=one, tenant=tenant, tokens=800)
        with pytest.raises(InferenceError) as caught:
            await inference_tokens_reserve(client, key=two, tenant=tenant, tokens=250)
        assert caught.value.status == 429 and caught.value.retry_after >= 1
        assert caught.value.message.startswith("tenant acme is at its limit of 1000 tokens per minute (all keys "
                                               "together) and this request may need 250; retry after ")
        await inference_tokens_settle(client, key=one, tenant=tenant, reserved=reserved, used=100)
        assert await inference_tokens_reserve(client, key=two, tenant=tenant, tokens=250) == 250
        with pytest.raises(InferenceError) as caught:  # the tenant has room; the key's own 300 do not
            await inference_tokens_reserve(client, key=two, tenant=tenant, tokens=100)
        assert caught.value.message.startswith("this key is at its limit of 300 tokens per minute")
        with pytest.raises(InferenceError) as caught:
            await inference_tokens_reserve(client, key=two, tenant=tenant, tokens=301)
        assert (caught.value.status, caught.value.param) == (400, "max_tokens")
        assert await inference_tokens_reserve(client, key=one, tenant=tenant, tokens=600) == 600  # 1000-100-250

    run(main)


def test_the_in_flight_cap_refuses_the_next_until_one_ends(engine, tenant, two_keys, redis_client):
    tenant.max_in_flight = 2
    tenant.save()
    (_one, first), (_two, second) = two_keys
    gate = threading.Event()  # holds the first request on the engine; the second waits in its queue

    def script(request):
        if len(engine.requests) == 1:
            assert gate.wait(timeout=20)
        return words(request)

    engine.script = script

    async def main():
        async with asgi_client() as client:
            def send(secret):
                return asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=bearer(secret)))

            held = [send(first), send(second)]
            for _ in range(500):
                if queued(redis_client) == 2:
                    break
                await asyncio.sleep(0.01)
            refused = await send(first)
            after_refusal = queued(redis_client)
            gate.set()
            done = await held[0]
            admitted = await send(second)
            return refused, after_refusal, [done, await held[1]], admitted

    refused, after_refusal, held, admitted = run(main)
    message = assert_429(refused, "too_many_requests_in_flight")
    assert message == "tenant acme has 2 requests queued or running, its cap: wait for some to finish"
    assert after_refusal == 2  # nothing was enqueued for it
    assert [r.status_code for r in held] == [200, 200] and admitted.status_code == 200, admitted.text
    assert queued(redis_client) == 3
    assert Usage.objects.filter(error_code="too_many_requests_in_flight").count() == 1
    assert redis_client.zcard(in_flight_key(tenant.pk)) == 0  # every ended request was released
