"""One Redis client per process (per URL: tests point REDIS_URL at their own server)."""

from __future__ import annotations

import functools

import redis
from django.conf import settings


@functools.lru_cache(maxsize=4)
def _client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=10, health_check_interval=30)


def redis_client() -> redis.Redis:
    return _client_for(settings.REDIS_URL)
