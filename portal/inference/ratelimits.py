"""Rate limits and the in-flight cap in Redis, checked at admission before anything is enqueued.

Two holders have limits: the tenant, for all its keys together (``Tenant.requests_per_minute``,
``tokens_per_minute``, ``max_in_flight``), and each key, on top (``TenantAPIKey.requests_per_minute``,
``tokens_per_minute``; empty: only the tenant's apply). ``key_limit`` and ``tenant_limit`` describe a
holder's allowance; the functions below take every limit that applies to a request at once.

Each per-minute limit is a token bucket (one Redis hash per holder and limit): it holds at most a
minute's allowance, refills at allowance/60 per second, and a request takes what it costs or is
refused with the seconds until it would fit (``Retry-After``). So a holder may burst up to its
per-minute limit and then runs at the steady rate. One Lua script changes all of a request's buckets
at once: when one of them would refuse, none is charged, so a refusal by the tenant's bucket costs
the key nothing and the other way round.

Requests: every authenticated request costs 1, before its body is read.

Tokens: the engine owns the tokenizer, so at admission a request reserves its worst case,
``max_tokens`` plus a prompt estimate of ~4 characters a token; when it ends, the reservation is
settled against what the engine reported (prompt + completion tokens), refunding the difference
or charging the excess (a bucket may go below zero, which delays the next requests). A request
whose worst case exceeds a whole per-minute allowance could never be admitted: it gets a 400
naming ``max_tokens`` instead of a 429 that no retry would cure.

In flight: a sorted set per tenant holds its requests queued or running (member: request id, score:
its deadline). Admission drops the entries whose deadline has passed (a request that never ended
through ``in_flight_release``, say on a crashed portal, frees its place at its deadline) and adds the
request only while fewer than the cap are in the set; ``in_flight_release`` removes it when it ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from portal.inference.errors import InferenceError

# A refused in-flight request is told to retry after this long: requests end all the time, and the
# set cannot say which one ends first.
IN_FLIGHT_RETRY_AFTER_SECONDS = 1.0

# KEYS: the buckets. ARGV[1..3]: cost (may be negative: a refund), now, and whether a cost that does
# not fit a bucket is refused (1) or charged anyway (0: settling what was used); then for each bucket
# its capacity and refill per second. Returns {admitted (0/1), the 1-based index of the bucket that
# refused with the longest wait (0 when admitted), seconds until the cost would fit in all}.
_BUCKETS = """
local cost = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local refuse = ARGV[3] == '1'
local levels = {}
local worst, wait = 0, 0
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 + 2 * i])
  local rate = tonumber(ARGV[3 + 2 * i])
  local state = redis.call('HMGET', key, 'level', 'at')
  local level = tonumber(state[1]) or capacity
  local at = tonumber(state[2]) or now
  levels[i] = math.min(capacity, level + math.max(0, now - at) * rate)
  if refuse and cost > levels[i] and (cost - levels[i]) / rate > wait then
    worst, wait = i, (cost - levels[i]) / rate
  end
end
if worst > 0 then
  return {0, worst, tostring(wait)}
end
for i, key in ipairs(KEYS) do
  local capacity = tonumber(ARGV[2 + 2 * i])
  local rate = tonumber(ARGV[3 + 2 * i])
  redis.call('HSET', key, 'level', tostring(math.min(capacity, levels[i] - cost)), 'at', tostring(now))
  redis.call('EXPIRE', key, math.ceil(capacity / rate) + 60)
end
return {1, 0, '0'}
"""

# KEYS[1]: the tenant's set. ARGV: now, cap, request id, its deadline. Returns {admitted (0/1), the
# requests in flight (counting this one when admitted)}. Admitting a request that is already in the
# set only moves its deadline, so a second admission of one request takes no second place.
_IN_FLIGHT = """
local now = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local deadline = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) then
  if count >= cap then
    return {0, count}
  end
  count = count + 1
end
redis.call('ZADD', KEYS[1], deadline, ARGV[3])
local ttl = math.ceil(deadline - now) + 60
if redis.call('TTL', KEYS[1]) < ttl then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return {1, count}
"""


@dataclass(frozen=True)
class Limit:
    """One holder's allowance per minute of something (requests or tokens); None or 0: no limit."""

    holder: str  # the holder's part of the bucket's name: "key:<id>" or "tenant:<id>"
    per_minute: int | None
    name: str  # how a message names the holder: "this key", "tenant acme"
    scope: str = ""  # what the allowance covers, said after it: "all keys together"

    def at_limit(self, unit: str) -> str:
        scope = f" ({self.scope})" if self.scope else ""
        return f"{self.name} is at its limit of {self.per_minute} {unit} per minute{scope}"

    def allowance(self, unit: str) -> str:
        scope = f" ({self.scope})" if self.scope else ""
        return f"{self.name}'s {self.per_minute} {unit} per minute{scope}"


def key_limit(*, key_id: Any, per_minute: int | None) -> Limit:
    return Limit(f"key:{key_id}", per_minute, "this key")


def tenant_limit(*, tenant_id: Any, slug: str, per_minute: int | None) -> Limit:
    return Limit(f"tenant:{tenant_id}", per_minute, f"tenant {slug}", "all keys together")


def bucket_key(holder: str, limit: str) -> str:
    return f"lf:ratelimit:{holder}:{limit}"


def in_flight_key(tenant_id: Any) -> str:
    return f"lf:inflight:tenant:{tenant_id}"


def _retry_after(wait: float) -> int:
    return max(1, math.ceil(wait))


async def _take(client: Any, limits: Sequence[Limit], kind: str, cost: float, *, refuse: bool,
                now: float | None) -> tuple[Limit, float] | None:
    """Charge ``cost`` to every limited bucket, or to none; returns the limit that refused and the seconds
    to wait, or None when charged."""
    limited = [limit for limit in limits if limit.per_minute]
    if not limited:
        return None
    args: list[Any] = [cost, now if now is not None else time.time(), int(refuse)]
    for limit in limited:
        args += [limit.per_minute, limit.per_minute / 60.0]
    admitted, worst, wait = await client.eval(
        _BUCKETS, len(limited), *(bucket_key(limit.holder, kind) for limit in limited), *args
    )
    return None if int(admitted) else (limited[int(worst) - 1], float(wait))


async def rate_limit_requests(client: Any, *, limits: Sequence[Limit], now: float | None = None) -> None:
    """Take one request from every limit, or from none and raise a 429 naming the one that refused."""
    refused = await _take(client, limits, "requests", 1, refuse=True, now=now)
    if refused:
        limit, wait = refused
        raise InferenceError(f"{limit.at_limit('requests')}; retry after {_retry_after(wait)} s",
                             code="rate_limit_exceeded", retry_after=wait)


async def rate_limit_tokens_reserve_all(client: Any, *, limits: Sequence[Limit], tokens: int,
                                        now: float | None = None) -> int:
    """Reserve ``tokens`` from every limit, or from none; returns what was reserved (0 when none limits tokens)."""
    limited = [limit for limit in limits if limit.per_minute]
    if not limited:
        return 0
    for limit in limited:
        if tokens > limit.per_minute:
            raise InferenceError(
                f"this request may use up to {tokens} tokens (max_tokens for each of its n choices, plus the "
                f"prompt), more than {limit.allowance('tokens')}; lower max_tokens or n, or shorten the prompt",
                code="invalid_value", param="max_tokens",
            )
    refused = await _take(client, limited, "tokens", tokens, refuse=True, now=now)
    if refused:
        limit, wait = refused
        raise InferenceError(
            f"{limit.at_limit('tokens')} and this request may need {tokens}; retry after {_retry_after(wait)} s "
            "or lower max_tokens",
            code="rate_limit_exceeded", retry_after=wait,
        )
    return tokens


async def rate_limit_tokens_settle_all(client: Any, *, limits: Sequence[Limit], reserved: int, used: int,
                                       now: float | None = None) -> None:
    """Replace a reservation by what the request used, in every limit it was reserved from."""
    if reserved and used != reserved:
        await _take(client, limits, "tokens", used - reserved, refuse=False, now=now)


async def in_flight_admit(client: Any, *, tenant_id: Any, slug: str, cap: int | None, request_id: str,
                          deadline: float, now: float | None = None) -> None:
    """Count the request among its tenant's queued and running ones until ``in_flight_release`` (or its
    deadline), or raise a 429 when the tenant already has ``cap`` of them. None or 0: no cap."""
    if not cap:
        return
    admitted, count = await client.eval(_IN_FLIGHT, 1, in_flight_key(tenant_id),
                                        now if now is not None else time.time(), cap, request_id, deadline)
    if not int(admitted):
        raise InferenceError(
            f"tenant {slug} has {int(count)} requests queued or running, its cap: wait for some to finish",
            code="too_many_requests_in_flight", retry_after=IN_FLIGHT_RETRY_AFTER_SECONDS,
        )


async def in_flight_release(client: Any, *, tenant_id: Any, request_id: str) -> None:
    """The request has ended (a no-op for one that was never admitted or was released already)."""
    await client.zrem(in_flight_key(tenant_id), request_id)

