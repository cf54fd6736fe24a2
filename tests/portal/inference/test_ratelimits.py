"""Token buckets and the in-flight cap in real Redis: bursts up to the per-minute limit, steady refill,
reservations settled, a key's and its tenant's buckets charged together or not at all."""

import pytest
import redis.asyncio

from portal.inference.errors import InferenceError
from portal.inference.ratelimits import (
    bucket_key,
    in_flight_admit,
    in_flight_key,
    in_flight_release,
    key_limit,
    rate_limit_requests,
    rate_limit_tokens_reserve_all,
    rate_limit_tokens_settle_all,
    tenant_limit,
)
from tests.portal.inference.conftest import run

T0 = 1_000_000.0


def with_client(redis_url, body):
    async def main():
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await body(client)
        finally:
            await client.aclose()

    return run(main)


def key(per_minute, key_id="k"):
    return [key_limit(key_id=key_id, per_minute=per_minute)]


def test_requests_burst_to_the_limit_then_refill_at_the_steady_rate(redis_client, redis_url):
    async def body(client):
        for _ in range(3):
            await rate_limit_requests(client, limits=key(3), now=T0)
        with pytest.raises(InferenceError) as caught:
            await rate_limit_requests(client, limits=key(3), now=T0 + 1)
        assert caught.value.status == 429 and caught.value.code == "rate_limit_exceeded"
        assert caught.value.retry_after == pytest.approx(19.0)  # one request every 20 s
        assert caught.value.message == "this key is at its limit of 3 requests per minute; retry after 19 s"
        await rate_limit_requests(client, limits=key(3), now=T0 + 20)
        await rate_limit_requests(client, limits=key(3, "other"), now=T0 + 20)  # per key
        for _ in range(100):
            await rate_limit_requests(client, limits=key(None), now=T0 + 20)  # unlimited
        await rate_limit_requests(client, limits=[], now=T0 + 20)

    with_client(redis_url, body)
    assert 0 < redis_client.ttl(bucket_key("key:k", "requests")) <= 120


def test_a_tenant_limit_counts_all_its_keys_and_a_refusal_charges_no_bucket(redis_client, redis_url):
    tenant = tenant_limit(tenant_id=7, slug="acme", per_minute=4)

    def limits(key_id, per_minute=None):
        return [tenant, key_limit(key_id=key_id, per_minute=per_minute)]

    async def body(client):
        for key_id in ("a", "b", "a", "b"):
            await rate_limit_requests(client, limits=limits(key_id), now=T0)
        with pytest.raises(InferenceError) as caught:
            await rate_limit_requests(client, limits=limits("c"), now=T0)  # a third key: the tenant is spent
        assert caught.value.message == ("tenant acme is at its limit of 4 requests per minute (all keys together); "
                                        "retry after 15 s")
        assert caught.value.retry_after == pytest.approx(15.0)

        # A key's own lower limit applies on top; refused by the key, the tenant is not charged.
        await rate_limit_requests(client, limits=limits("d", 1), now=T0 + 30)  # the tenant has 2 back
        with pytest.raises(InferenceError) as caught:
            await rate_limit_requests(client, limits=limits("d", 1), now=T0 + 30)
        assert caught.value.message == "this key is at its limit of 1 requests per minute; retry after 60 s"
        await rate_limit_requests(client, limits=limits("e"), now=T0 + 30)  # the tenant still had one
        with pytest.raises(InferenceError) as caught:
            await rate_limit_requests(client, limits=limits("e"), now=T0 + 30)
        assert "tenant acme" in caught.value.message and caught.value.retry_after == pytest.approx(15.0)
        with pytest.raises(InferenceError) as caught:  # both refuse: the longer wait is named
            await rate_limit_requests(client, limits=limits("d", 1), now=T0 + 30)
        assert caught.value.retry_after == pytest.approx(60.0) and "this key" in caught.value.message

    with_client(redis_url, body)
    assert float(redis_client.hget(bucket_key("key:c", "requests"), "level") or 0) == 0  # never written


def test_tokens_are_reserved_then_settled_to_what_was_used(redis_client, redis_url):
    async def body(client):
        reserved = await rate_limit_tokens_reserve_all(client, limits=key(600), tokens=500, now=T0)
        assert reserved == 500
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve_all(client, limits=key(600), tokens=200, now=T0)
        assert caught.value.status == 429 and caught.value.retry_after == pytest.approx(10.0)  # 10 tokens/s
        await rate_limit_tokens_settle_all(client, limits=key(600), reserved=500, used=50, now=T0)
        await rate_limit_tokens_reserve_all(client, limits=key(600), tokens=200, now=T0)  # refunded
        # Using more than reserved is charged: the bucket goes below zero and the next request waits.
        await rate_limit_tokens_settle_all(client, limits=key(600), reserved=200, used=1000, now=T0)
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve_all(client, limits=key(600), tokens=1, now=T0)
        assert caught.value.retry_after == pytest.approx(45.1)  # 600 - 500 + 450 - 200 - 800 = -450 tokens
        assert await rate_limit_tokens_reserve_all(client, limits=key(None), tokens=10**9) == 0

    with_client(redis_url, body)


def test_tokens_of_all_keys_count_against_the_tenant_and_settle_in_both(redis_client, redis_url):
    tenant = tenant_limit(tenant_id=7, slug="acme", per_minute=1000)

    async def body(client):
        first = await rate_limit_tokens_reserve_all(client, limits=[tenant, *key(None, "a")], tokens=600, now=T0)
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve_all(client, limits=[tenant, *key(None, "b")], tokens=600, now=T0)
        assert caught.value.message.startswith(
            "tenant acme is at its limit of 1000 tokens per minute (all keys together) and this request may need 600")
        await rate_limit_tokens_settle_all(client, limits=[tenant, *key(None, "a")], reserved=first, used=100, now=T0)
        await rate_limit_tokens_reserve_all(client, limits=[tenant, *key(None, "b")], tokens=600, now=T0)

        # The key's own limit: reserved from, and refunded to, the key and the tenant together.
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve_all(client, limits=[tenant, *key(200, "c")], tokens=250, now=T0)
        assert (caught.value.status, caught.value.param) == (400, "max_tokens")
        assert "this key's 200 tokens per minute" in caught.value.message
        reserved = await rate_limit_tokens_reserve_all(client, limits=[tenant, *key(200, "c")], tokens=200, now=T0)
        with pytest.raises(InferenceError):  # the tenant has 100 left
            await rate_limit_tokens_reserve_all(client, limits=[tenant, *key(None, "a")], tokens=150, now=T0)
        await rate_limit_tokens_settle_all(client, limits=[tenant, *key(200, "c")], reserved=reserved, used=0, now=T0)
        await rate_limit_tokens_reserve_all(client, limits=[tenant, *key(200, "c")], tokens=200, now=T0)
        await rate_limit_tokens_reserve_all(client, limits=[tenant, *key(None, "a")], tokens=100, now=T0)

    with_client(redis_url, body)
    assert float(redis_client.hget(bucket_key("tenant:7", "tokens"), "level")) == pytest.approx(0)
    assert float(redis_client.hget(bucket_key("key:c", "tokens"), "level")) == pytest.approx(0)


def test_a_request_larger_than_the_whole_allowance_is_a_400_naming_max_tokens(redis_client, redis_url):
    async def body(client):
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve_all(client, limits=key(100), tokens=101, now=T0)
        assert (caught.value.status, caught.value.param) == (400, "max_tokens")
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve_all(
                client, limits=[tenant_limit(tenant_id=1, slug="acme", per_minute=100), *key(None)], tokens=101)
        assert "tenant acme's 100 tokens per minute (all keys together)" in caught.value.message

    with_client(redis_url, body)


def test_the_in_flight_cap_refuses_past_it_until_one_is_released_or_its_deadline_passes(redis_client, redis_url):
    def admit(client, request_id, *, now=T0, deadline=T0 + 300, cap=2):
        return in_flight_admit(client, tenant_id=7, slug="acme", cap=cap, request_id=request_id, deadline=deadline,
                               now=now)

    async def body(client):
        await admit(client, "r1", deadline=T0 + 10)
        await admit(client, "r2")
        await admit(client, "r2")  # admitted again: still one place
        with pytest.raises(InferenceError) as caught:
            await admit(client, "r3")
        assert (caught.value.status, caught.value.code) == (429, "too_many_requests_in_flight")
        assert caught.value.message == ("tenant acme has 2 requests queued or running, its cap: "
                                        "wait for some to finish")
        assert caught.value.retry_after >= 1
        await in_flight_release(client, tenant_id=7, request_id="r2")
        await in_flight_release(client, tenant_id=7, request_id="r2")  # twice: no harm
        await admit(client, "r3")
        with pytest.raises(InferenceError):
            await admit(client, "r4", now=T0 + 5)
        await admit(client, "r4", now=T0 + 11)  # r1 never ended, but its deadline has passed
        await admit(client, "r5", cap=None)  # no cap
        await in_flight_release(client, tenant_id=7, request_id="never-admitted")
        await in_flight_admit(client, tenant_id=8, slug="other", cap=1, request_id="x", deadline=T0 + 300, now=T0)

    with_client(redis_url, body)
    assert {m.decode() for m in redis_client.zrange(in_flight_key(7), 0, -1)} == {"r3", "r4"}
    assert redis_client.ttl(in_flight_key(7)) > 0
