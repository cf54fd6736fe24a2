"""`make run`'s embedded Redis, started as portal.devstack starts it: bounded in memory, never evicting."""

from __future__ import annotations

import pytest
import redis

from portal.devstack import Stack, _without_password


@pytest.mark.parametrize("maxmemory, expected", [(None, 1 << 30), ("64mb", 64 << 20)])
def test_the_embedded_redis_is_bounded_and_never_evicts(tmp_path, monkeypatch, maxmemory, expected):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("LORAFLEET_VAR_DIR", str(tmp_path))
    if maxmemory:
        monkeypatch.setenv("LORAFLEET_REDIS_MAXMEMORY", maxmemory)
    else:
        monkeypatch.delenv("LORAFLEET_REDIS_MAXMEMORY", raising=False)
    stack = Stack()
    try:
        stack.start_redis()
        client = redis.Redis.from_url(stack.env["REDIS_URL"])
        assert client.config_get("maxmemory") == {"maxmemory": str(expected)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.config_set("maxmemory", 1)  # full: a write is refused, not made room for by evicting
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("key", "value")
        client.close()
    finally:
        stack.stop()


def test_a_redis_password_is_not_printed():
    assert _without_password("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert _without_password("unix:///tmp/redis.sock") == "unix:///tmp/redis.sock"
