"""Many tenants, one engine, under load: the real portal (uvicorn), Redis and the daemon, over HTTP.

Tenant A opens 600 concurrent streaming requests, tenant B 50, tenant C one. Nobody gets a 5xx;
each of A's requests completes or is refused with 429 and Retry-After by policy (its cap on
requests queued or running); all of B's and C's complete; and C's request is admitted by the
engine before A's backlog has drained, which the engine's own record of its admission order
(carried by each request's usage event) shows. Bounded: every request has a timeout and the
test stops by itself.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine_daemon import protocol
from engine_daemon.protocol import UsageEvent
from tests.e2e.conftest import TINY_MODEL, _tenant

pytestmark = pytest.mark.slow
COUNTS = {"tenant-a": 600, "tenant-b": 50, "tenant-c": 1}
MAX_NUM_SEQS = 8  # so that A's admitted requests make a backlog in the engine


async def stream_one(client: httpx.AsyncClient, key: str) -> dict:
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Ahoy"}], "max_tokens": 8, "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {key}"}) as reply:
        if reply.status_code != 200:
            text = (await reply.aread()).decode()
            return {"status": reply.status_code, "retry_after": reply.headers.get("retry-after"), "body": text}
        request_id, done = None, False
        async for line in reply.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                request_id = request_id or json.loads(line[6:])["id"]
        return {"status": 200, "done": done, "request_id": request_id}


def test_a_flood_from_one_tenant_hurts_no_other(stack):
    stack.tenants["tenant-c"] = _tenant("tenant-c")
    stack.daemon.stop()
    stack.daemon.start("--max-num-seqs", str(MAX_NUM_SEQS), engine_id="e2e-load")
    stack.daemon.wait_ready()

    async def main() -> dict[str, list[dict]]:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=httpx.Timeout(180)) as client:
            flood = [asyncio.create_task(stream_one(client, stack.tenants["tenant-a"].inference_key))
                     for _ in range(COUNTS["tenant-a"])]
            await asyncio.sleep(1.0)  # A's backlog is queued before the others arrive
            others = [asyncio.create_task(stream_one(client, stack.tenants["tenant-b"].inference_key))
                      for _ in range(COUNTS["tenant-b"])]
            await asyncio.sleep(0.5)
            single = asyncio.create_task(stream_one(client, stack.tenants["tenant-c"].inference_key))
            return {"tenant-a": await asyncio.gather(*flood), "tenant-b": await asyncio.gather(*others),
                    "tenant-c": [await single]}

    results = asyncio.run(asyncio.wait_for(main(), timeout=300))
    statuses = {slug: sorted({r["status"] for r in rows}) for slug, rows in results.items()}
    assert all(status < 500 for rows in statuses.values() for status in rows), statuses
    refused = [r for r in results["tenant-a"] if r["status"] != 200]
    assert all(r["status"] == 429 and int(r["retry_after"]) >= 1 for r in refused), refused[:3]
    assert all("too_many_requests_in_flight" in r["body"] for r in refused), refused[:1]
    served_a = [r for r in results["tenant-a"] if r["status"] == 200]
    assert served_a and all(r["done"] for r in served_a)
    for slug in ("tenant-b", "tenant-c"):
        assert all(r["status"] == 200 and r["done"] for r in results[slug]), (slug, statuses[slug])

    usage = {e.request_id: e for e in (UsageEvent.from_redis(f) for _id, f in stack.redis.xrange(protocol.USAGE_STREAM))
             if e.engine_id == "e2e-load"}
    admissions_a = [usage[r["request_id"]].admission for r in served_a]
    c_admission = usage[results["tenant-c"][0]["request_id"]].admission
    assert c_admission < max(admissions_a), (c_admission, sorted(admissions_a)[-5:])
    print(f"A: {len(served_a)} served, {len(refused)} refused (429); B: {COUNTS['tenant-b']} served; "
          f"C admitted {c_admission}th, A's last {max(admissions_a)}th")
