"""The response streams of the requests this process waits on, read for all of them by one reader per event loop.

A waiting request holds no Redis connection. It subscribes to its response stream (``lf:resp:<id>``) and
awaits the subscription; the loop's ``ResponseReader`` reads every subscribed stream in blocking XREADs, each
stream from its own cursor, and hands each subscription its entries once, in stream order. So a thousand
waiting requests cost a couple of connections, not a thousand (one each exhausted the pool: issue 15)::

    subscription = reader.subscribe(protocol.response_stream(request_id))
    try:
        entries = await subscription.entries(timeout=30)  # what arrived; [] when nothing did in time
    finally:
        subscription.close()

- The streams are read in shards of at most ``STREAMS_PER_READ``, each with its own connection and task,
  blocking ``BLOCK_SECONDS`` at a time, so that a stream subscribed while its shard blocks is read by the
  next call. A shard with nothing to read waits without touching Redis, and ends after ``IDLE_SECONDS``.
- A Redis error does not reach the subscriptions at once: the shard reconnects with a growing back-off and
  reads on from the cursors, so nothing is lost or read twice. Once Redis has been unreachable for
  ``OUTAGE_GRACE_SECONDS``, the shard's subscriptions raise ``ResponsesUnavailable``.
- The owner of a subscription closes it (in a ``finally``: a cancelled request must not stay subscribed).
  The shards' tasks end when their loop closes (``asyncio.run`` cancels them) and close their connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

# One XREAD names at most this many streams: the reply, and the work Redis does to block on the keys,
# stay small, and a burst of requests spreads over a few connections.
STREAMS_PER_READ = 500
# How long one XREAD blocks: the longest a stream subscribed meanwhile waits to be read.
BLOCK_SECONDS = 0.1
# Entries read from one stream per call (a stream with more is read on at the next call).
ENTRIES_PER_STREAM = 64
# A shard that had nothing to read for this long ends, and closes its connection.
IDLE_SECONDS = 30.0
# How long Redis may be unreachable before the waiting requests are told.
OUTAGE_GRACE_SECONDS = 5.0
# Reconnecting waits this long after the first failure, doubling up to the second figure.
BACKOFF_SECONDS = (0.05, 1.0)

Entry = dict[bytes, bytes]


class ResponsesUnavailable(Exception):
    """The response streams cannot be read: Redis is unreachable (raised past ``OUTAGE_GRACE_SECONDS``)."""


class Subscription:
    """One stream's entries as the reader hands them over; made by ``ResponseReader.subscribe``."""

    def __init__(self, stream: str, shard: _Shard) -> None:
        self.stream = stream
        self.cursor = "0-0"  # the last entry read; only the shard moves it
        self.closed = False
        self._shard = shard
        self._entries: deque[Entry] = deque()
        self._arrived = asyncio.Event()
        self._failure: BaseException | None = None

    async def entries(self, *, timeout: float) -> list[Entry]:
        """The entries that arrived since the last call, waiting up to ``timeout`` seconds for one; [] when
        none came. Raises ``ResponsesUnavailable`` (or the reader's own failure) once nothing more can come."""
        if not self._entries and self._failure is None:
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                pass
        if self._entries:
            taken = list(self._entries)
            self._entries.clear()
            return taken
        if self._failure is not None:
            raise self._failure
        return []

    def outage(self) -> ResponsesUnavailable | None:
        """Why the reader cannot read right now (Redis is unreachable, even within the grace), else None."""
        return self._shard.outage()

    def close(self) -> None:
        """Stop reading the stream (idempotent)."""
        if not self.closed:
            self.closed = True
            self._shard.remove(self)

    def _deliver(self, entries: list[Entry]) -> None:
        self._entries.extend(entries)
        self._arrived.set()

    def _fail(self, failure: BaseException) -> None:
        self._failure = failure
        self._arrived.set()


class ResponseReader:
    """Reads the subscribed streams of one event loop from one Redis; see the module docstring."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._shards: list[_Shard] = []

    def subscribe(self, stream: str) -> Subscription:
        """Start reading ``stream`` from its first entry; call from the reader's event loop."""
        if any(stream in s.subscriptions for s in self._shards):
            raise ValueError(f"{stream} is subscribed already")
        shard = next((s for s in self._shards if len(s.subscriptions) < STREAMS_PER_READ), None)
        if shard is None:
            shard = _Shard(self)
            self._shards.append(shard)
        return shard.add(stream)

    @property
    def connections(self) -> int:
        """How many shards (each one connection) are running."""
        return len(self._shards)

    def _ended(self, shard: _Shard) -> None:
        self._shards.remove(shard)


class _Shard:
    """Up to ``STREAMS_PER_READ`` subscriptions, read by one task on one connection."""

    def __init__(self, reader: ResponseReader) -> None:
        self.reader = reader
        self.subscriptions: dict[str, Subscription] = {}
        self._changed = asyncio.Event()
        self._down_since: float | None = None  # monotonic time of the first failure in a row
        self._error: Exception | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lorafleet response reader")

    def add(self, stream: str) -> Subscription:
        subscription = Subscription(stream, self)
        self.subscriptions[stream] = subscription
        self._changed.set()
        return subscription

    def remove(self, subscription: Subscription) -> None:
        if self.subscriptions.get(subscription.stream) is subscription:
            del self.subscriptions[subscription.stream]

    def outage(self) -> ResponsesUnavailable | None:
        if self._down_since is None:
            return None
        return ResponsesUnavailable(f"reading the response streams failed for "
                                    f"{time.monotonic() - self._down_since:.1f} s: {self._error}")

    async def _run(self) -> None:
        client = redis.asyncio.Redis.from_url(self.reader.url, single_connection_client=True,
                                              socket_connect_timeout=5, socket_timeout=BLOCK_SECONDS + 5,
                                              health_check_interval=30, retry=Retry(NoBackoff(), 0))
        try:
            await self._read(client)
        except asyncio.CancelledError:  # the loop is closing
            raise
        except Exception as exc:  # a bug: the waiting requests must not wait for their deadline
            log.exception("the response reader failed")
            for subscription in list(self.subscriptions.values()):
                subscription._fail(exc)
        finally:
            self.reader._ended(self)  # before any await: a subscription made from now on gets a new shard
            await client.aclose()

    async def _read(self, client: redis.asyncio.Redis) -> None:
        backoff = BACKOFF_SECONDS[0]
        while True:
            if not self.subscriptions:
                self._changed.clear()
                try:
                    async with asyncio.timeout(IDLE_SECONDS):
                        await self._changed.wait()
                except TimeoutError:
                    if not self.subscriptions:
                        return
                continue
            try:
                reply = await self._read_once(client)
            except redis.RedisError as exc:
                self._failed(exc)
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_SECONDS[1])
                continue
            if self._down_since is not None:
                log.warning("reading the response streams again after %.1f s",
                            time.monotonic() - self._down_since)
                self._down_since, self._error, backoff = None, None, BACKOFF_SECONDS[0]
            self._dispatch(reply)

    async def _read_once(self, client: redis.asyncio.Redis) -> Any:
        """One XREAD of every subscribed stream from its cursor, which the loop's closing cancels at once.

        redis-py's asyncio client (8.1) sometimes swallows a cancellation that arrives just as a reply is read
        (measured: 2 of 30 cancelled blocking XREADs carried on), and a reader that carried on would keep its
        loop from closing. So the read runs in its own task behind a shield; when cancelled, the shard waits
        for that task (it ends within its block time) before its connection is closed under it.
        """
        cursors = {s.stream: s.cursor for s in self.subscriptions.values()}
        read = asyncio.ensure_future(client.xread(cursors, count=ENTRIES_PER_STREAM, block=int(BLOCK_SECONDS * 1000)))
        try:
            return await asyncio.shield(read)
        except asyncio.CancelledError:
            read.cancel()
            await asyncio.wait([read], timeout=BLOCK_SECONDS + 1)
            if read.done() and not read.cancelled():
                read.exception()  # retrieved: it ended with an error, or with a reply nobody reads now
            raise

    def _dispatch(self, reply: Any) -> None:
        for name, entries in reply or []:
            subscription = self.subscriptions.get(name.decode() if isinstance(name, bytes) else name)
            if subscription is None or not entries:  # closed while the read was under way
                continue
            last_id = entries[-1][0]
            subscription.cursor = last_id.decode() if isinstance(last_id, bytes) else last_id
            subscription._deliver([fields for _id, fields in entries])

    def _failed(self, exc: redis.RedisError) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning("reading the response streams failed: %s; retrying", exc)
        self._error = exc
        if now - self._down_since >= OUTAGE_GRACE_SECONDS:
            failure = self.outage()
            for subscription in list(self.subscriptions.values()):
                subscription._fail(failure)
