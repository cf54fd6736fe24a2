"""Per-key rate limits in Redis: requests per minute and tokens per minute, from the key's tenant.

Each limit is a token bucket (one Redis hash per key and limit, changed atomically by one Lua
script): it holds at most a minute's allowance, refills at allowance/60 per second, and a request
takes what it costs or is refused with the seconds until it would fit (``Retry-After``). So a key
may burst up to its per-minute limit and then runs at the steady rate.

Requests: every authenticated request costs 1, before its body is read.

Tokens: the engine owns the tokenizer, so at admission a request reserves its worst case,
``max_tokens`` plus a prompt estimate of ~4 characters a token; when it ends, the reservation is
settled against what the engine reported (prompt + completion tokens), refunding the difference
or charging the excess (the bucket may go below zero, which delays the next requests). A request
whose worst case exceeds the whole per-minute allowance could never be admitted: it gets a 400
naming ``max_tokens`` instead of a 429 that no retry would cure.
"""

from __future__ import annotations

import time
from typing import Any

from portal.inference.errors import InferenceError

# KEYS[1]: the bucket. ARGV: capacity, refill per second, cost (may be negative: a refund), now,
# and whether a cost that does not fit is refused (1) or charged anyway (0: settling what was used).
# Returns {admitted (0/1), seconds until the cost would fit}.
_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local refuse = ARGV[5] == '1'
local state = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
level = math.min(capacity, level + math.max(0, now - at) * rate)
local admitted = 1
local wait = 0
if refuse and cost > level then
  admitted = 0
  wait = (cost - level) / rate
else
  level = math.min(capacity, level - cost)
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 60)
return {admitted, tostring(wait)}
"""


def bucket_key(key_id: str, limit: str) -> str:
    return f"lf:ratelimit:{key_id}:{limit}"


async def _take(client: Any, key: str, per_minute: int, cost: float, *, refuse: bool, now: float | None) -> float:
    """0 when admitted, else the seconds to wait."""
    admitted, wait = await client.eval(
        _BUCKET, 1, key, per_minute, per_minute / 60.0, cost, now if now is not None else time.time(), int(refuse)
    )
    return 0.0 if int(admitted) else float(wait)


async def rate_limit_request(client: Any, *, key_id: str, requests_per_minute: int | None,
                             now: float | None = None) -> None:
    if not requests_per_minute:
        return
    wait = await _take(client, bucket_key(key_id, "requests"), requests_per_minute, 1, refuse=True, now=now)
    if wait:
        raise InferenceError(
            f"rate limit reached: this key may send {requests_per_minute} requests per minute; retry in {wait:.1f} s",
            code="rate_limit_exceeded", retry_after=wait,
        )


async def rate_limit_tokens_reserve(client: Any, *, key_id: str, tokens_per_minute: int | None, tokens: int,
                                    now: float | None = None) -> int:
    """Reserve ``tokens``; returns what was reserved (0 when the tenant has no token limit)."""
    if not tokens_per_minute:
        return 0
    if tokens > tokens_per_minute:
        raise InferenceError(
            f"this request may use up to {tokens} tokens (max_tokens plus the prompt), more than this key's "
            f"{tokens_per_minute} tokens per minute; lower max_tokens or shorten the prompt",
            code="invalid_value", param="max_tokens",
        )
    wait = await _take(client, bucket_key(key_id, "tokens"), tokens_per_minute, tokens, refuse=True, now=now)
    if wait:
        raise InferenceError(
            f"rate limit reached: this key may use {tokens_per_minute} tokens per minute and this request may "
            f"need {tokens}; retry in {wait:.1f} s or lower max_tokens",
            code="rate_limit_exceeded", retry_after=wait,
        )
    return tokens


async def rate_limit_tokens_settle(client: Any, *, key_id: str, tokens_per_minute: int | None, reserved: int,
                                   used: int, now: float | None = None) -> None:
    """Replace a reservation by what the request used."""
    if not tokens_per_minute or used == reserved:
        return
    await _take(client, bucket_key(key_id, "tokens"), tokens_per_minute, used - reserved, refuse=False, now=now)
