"""Token buckets in real Redis: bursts up to the per-minute limit, steady refill, reservations settled."""

import pytest
import redis.asyncio

from portal.inference.errors import InferenceError
from portal.inference.ratelimits import (
    bucket_key,
    rate_limit_request,
    rate_limit_tokens_reserve,
    rate_limit_tokens_settle,
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


def test_requests_burst_to_the_limit_then_refill_at_the_steady_rate(redis_client, redis_url):
    async def body(client):
        for _ in range(3):
            await rate_limit_request(client, key_id="k", requests_per_minute=3, now=T0)
        with pytest.raises(InferenceError) as caught:
            await rate_limit_request(client, key_id="k", requests_per_minute=3, now=T0 + 1)
        assert caught.value.status == 429 and caught.value.code == "rate_limit_exceeded"
        assert caught.value.retry_after == pytest.approx(19.0)  # one request every 20 s
        await rate_limit_request(client, key_id="k", requests_per_minute=3, now=T0 + 20)
        await rate_limit_request(client, key_id="other", requests_per_minute=3, now=T0 + 20)  # per key
        for _ in range(100):
            await rate_limit_request(client, key_id="k", requests_per_minute=None, now=T0 + 20)  # unlimited

    with_client(redis_url, body)
    assert 0 < redis_client.ttl(bucket_key("k", "requests")) <= 120


def test_tokens_are_reserved_then_settled_to_what_was_used(redis_client, redis_url):
    async def body(client):
        reserved = await rate_limit_tokens_reserve(client, key_id="k", tokens_per_minute=600, tokens=500, now=T0)
        assert reserved == 500
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve(client, key_id="k", tokens_per_minute=600, tokens=200, now=T0)
        assert caught.value.status == 429 and caught.value.retry_after == pytest.approx(10.0)  # 10 tokens/s
        await rate_limit_tokens_settle(client, key_id="k", tokens_per_minute=600, reserved=500, used=50, now=T0)
        await rate_limit_tokens_reserve(client, key_id="k", tokens_per_minute=600, tokens=200, now=T0)  # refunded
        # Using more than reserved is charged: the bucket goes below zero and the next request waits.
        await rate_limit_tokens_settle(client, key_id="k", tokens_per_minute=600, reserved=200, used=1000, now=T0)
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve(client, key_id="k", tokens_per_minute=600, tokens=1, now=T0)
        assert caught.value.retry_after == pytest.approx(45.1)  # 600 - 500 + 450 - 200 - 800 = -450 tokens
        assert await rate_limit_tokens_reserve(client, key_id="k", tokens_per_minute=None, tokens=10**9) == 0

    with_client(redis_url, body)


def test_a_request_larger_than_the_whole_allowance_is_a_400_naming_max_tokens(redis_client, redis_url):
    async def body(client):
        with pytest.raises(InferenceError) as caught:
            await rate_limit_tokens_reserve(client, key_id="k", tokens_per_minute=100, tokens=101, now=T0)
        assert (caught.value.status, caught.value.param) == (400, "max_tokens")

    with_client(redis_url, body)
