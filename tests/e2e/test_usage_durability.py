"""Usage that is never lost and never free, against the running product.

A client that hangs up after the prefill is billed the prompt the engine computed; a portal killed
with SIGKILL mid-stream loses no usage row, because the engine reports every end on the usage
stream and the usage writer (``usage_stream_drain``, Celery beat's task) records it.
"""

from __future__ import annotations

import json
import time

import httpx

from engine_daemon import protocol
from engine_daemon.protocol import UsageEvent
from portal.usage.models import Usage
from portal.usage.services import usage_stream_drain
from tests.e2e.conftest import TINY_MODEL
from tests.e2e.stack import wait_for

LONG = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Ahoy matey, tell me a long tale"}],
        "max_tokens": 300, "stream": True}


def first_chunk_id(lines) -> str:
    """The request id from the first chunk; ``lines`` stays open (dropping it would close the connection)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            return json.loads(line[6:])["id"]
    raise AssertionError("the stream ended before its first chunk")


def usage_event(stack, request_id: str) -> UsageEvent | None:
    for _id, fields in stack.redis.xrange(protocol.USAGE_STREAM):
        event = UsageEvent.from_redis(fields)
        if event.request_id == request_id:
            return event
    return None


def written(stack, request_id: str) -> Usage | None:
    usage_stream_drain(client=stack.redis, consumer="e2e-writer")
    return Usage.objects.filter(request_id=request_id, engine_reported=True).first()


def test_a_client_that_hangs_up_after_the_prefill_pays_for_the_prompt(stack):
    key = stack.tenants["tenant-a"].inference_key
    with httpx.Client(base_url=stack.url, timeout=60) as client, client.stream(
        "POST", "/v1/chat/completions", json=LONG, headers={"Authorization": f"Bearer {key}"}
    ) as reply:
        request_id = first_chunk_id(reply.iter_lines())
    # the portal sees the disconnect, cancels on the engine, which reports what it computed
    event = wait_for(lambda: usage_event(stack, request_id), "the engine's usage event", 60)
    assert event.end == UsageEvent.CANCELLED and event.prompt_tokens > 5 and event.completion_tokens < 300
    usage = wait_for(lambda: written(stack, request_id), "the usage row", 30)
    assert usage.prompt_tokens == event.prompt_tokens and usage.status == Usage.Status.CANCELLED


def test_a_portal_killed_mid_stream_loses_no_usage_row(stack):
    key = stack.tenants["tenant-a"].inference_key
    client = httpx.Client(base_url=stack.url, timeout=60)
    reply = client.send(client.build_request("POST", "/v1/chat/completions", json=LONG,
                                             headers={"Authorization": f"Bearer {key}"}), stream=True)
    lines = reply.iter_lines()
    request_id = first_chunk_id(lines)
    stack.portal.process.kill()  # SIGKILL, the client still connected: no cancel, no usage written by the portal
    stack.portal.process.wait()
    lines.close()
    reply.close()
    client.close()
    started = time.monotonic()
    usage = wait_for(lambda: written(stack, request_id), "the usage row of the killed portal's request", 120)
    # ran to its end on the engine (300 tokens, or fewer where the random model says its end-of-turn)
    assert usage.status == Usage.Status.OK and 0 < usage.completion_tokens <= 300 and usage.prompt_tokens > 5
    assert not usage.portal_reported and usage.tenant.slug == "tenant-a"
    print(f"usage row written {time.monotonic() - started:.1f} s after the portal was killed")
