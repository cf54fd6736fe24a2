"""The engine daemon's Redis side: consume requests, stream tokens, obey control events, beat.

One loop on one thread owns the engine (DESIGN.md, "Processes and the path of one request"):

    control events → new requests (XREADGROUP) → engine.step() → one pipelined write of every
    request's new tokens, ``done`` events and XACKs → deadlines → heartbeat (once a second)

Fair share from the queue on: every tenant has its own request stream per base model
(``protocol.request_stream``), listed with its weight in ``protocol.tenant_index``. Each read
divides the room the engine has among the listed tenants by weight, starting from a rotating
tenant, so one tenant's backlog never stands between another tenant and the scheduler, whose
weighted fair share then orders what was read.

At-least-once delivery: a request is XACKed (and its entry deleted, so Redis holds only work in
flight) only once it has ended. Entries that a dead daemon held are XAUTOCLAIMed after
``claim_idle_seconds``; the tokens it had already streamed are read back from the response stream
and the request resumes after them, so a client never sees a token twice. A live daemon keeps its
own entries fresh (XCLAIM JUSTID) so nobody steals them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from engine_daemon import protocol
from engine_daemon.config import ServiceConfig
from engine_daemon.engine import Engine, RequestError, StepOutput
from engine_daemon.peft_format import AdapterError, cached_adapter_dir
from engine_daemon.protocol import (
    ControlEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    Heartbeat,
    InferenceRequest,
    ProtocolError,
    UsageEvent,
    text_of,
)

__all__ = ["EngineService", "ServiceConfig", "install_signal_handlers"]

log = logging.getLogger("lorafleet.daemon")


# The usage stream is drained by the portal's usage writers; this cap only guards Redis if none runs for days.
USAGE_STREAM_MAXLEN = 1_000_000

# Adapters a heartbeat lists: every one resident or failed, and others used this recently, at most this many.
BEAT_ADAPTERS_RECENT_SECONDS = 3600
BEAT_ADAPTERS_MAX = 256
# Tenants whose prefix cache hit rate a heartbeat lists: those with the most prompt tokens.
BEAT_PREFIX_TENANTS_MAX = 64


@dataclass
class SentChoice:
    """What was streamed of one choice before a daemon died (read back from the response stream)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    def ended_by(self, max_tokens: int) -> SentChoice:
        """This choice, ended with "length" if it has all its tokens already."""
        if self.finish_reason is None and len(self.token_ids) >= max_tokens:
            return replace(self, finish_reason="length")
        return self


@dataclass
class InFlight:
    entry_id: str
    source: str  # the tenant's request stream the entry came from
    request: InferenceRequest
    stream: str  # the response stream
    sent_tokens: int = 0
    first_token_at: float | None = None


class EngineService:
    def __init__(self, engine: Engine, config: ServiceConfig, client: redis.Redis | None = None) -> None:
        self.engine = engine
        self.config = config
        self.redis = client or redis.Redis.from_url(config.redis_url)
        self.engine_id = config.engine_id or f"{socket.gethostname()}-{os.getpid()}"
        self.base_model = engine.model_name
        self.tenant_streams: dict[str, tuple[str, float]] = {}  # request stream → (tenant id, weight)
        self._tenants_read_at = -math.inf
        self._round_robin = 0
        self.in_flight: dict[str, InFlight] = {}
        self.cancelled: dict[str, float] = {}  # request id → when its cancel arrived (oldest first)
        self.stop_requested = threading.Event()
        self.draining_since: float | None = None
        self._control_cursor = "$"
        self._last_beat = 0.0
        self._last_claim = 0.0
        self.metrics_url: str | None = None
        self.on_step: list[Any] = []  # callbacks (outputs, seconds) — the Prometheus exporter hooks in here
        self.on_beat: list[Any] = []  # callbacks () once a second, idle or not

    # ---- start and stop --------------------------------------------------------------------

    def start(self) -> None:
        self._control_cursor = self._stream_tail(protocol.CONTROL_STREAM)
        for sha in self.redis.smembers(protocol.PINNED_ADAPTERS_KEY):  # pins made before this engine started
            self._set_pinned(text_of(sha), True)
        self.redis.hset(protocol.BASE_MODELS_KEY, self.base_model, json.dumps(self.engine.descriptor.to_dict()))
        self._refresh_tenants(force=True)
        self._beat(force=True)
        log.info("engine %s serves %s for %d tenants", self.engine_id, self.base_model, len(self.tenant_streams))

    def request_stop(self, *_: object) -> None:
        """SIGTERM: take no new work; finish what is running for drain_seconds, hand back the rest."""
        self.stop_requested.set()

    def run(self) -> None:
        self.start()
        try:
            while True:
                if self.stop_requested.is_set() and self.draining_since is None:
                    self.draining_since = time.monotonic()
                    log.info("draining %d requests", len(self.in_flight))
                if self.draining_since is not None and self._drained():
                    break
                self.run_once()
        finally:
            self._hand_back()
            self.redis.delete(protocol.heartbeat_key(self.engine_id))
            self.redis.zrem(protocol.ENGINES_KEY, self.engine_id)
            self.engine.close()

    def _drained(self) -> bool:
        overdue = time.monotonic() - self.draining_since > self.config.drain_seconds
        return not self.in_flight or overdue

    def _hand_back(self) -> None:
        """Abort what is left without acking it: another daemon claims it and resumes after the sent tokens."""
        for request_id in list(self.in_flight):
            self.engine.abort(request_id)
        if self.in_flight:
            log.info("handed back %d unfinished requests", len(self.in_flight))
        self.in_flight.clear()

    # ---- one turn of the loop ------------------------------------------------------------

    def run_once(self) -> None:
        self._read_control()
        if self.draining_since is None:
            now = time.monotonic()
            if now - self._last_claim > max(1.0, self.config.claim_idle_seconds / 2):
                self._last_claim = now
                self._claim_abandoned()
            self._read_requests()
        if self.engine.has_unfinished() or self.engine.residency.busy:
            started = time.perf_counter()
            outputs = self.engine.step()  # also applies finished background adapter loads
            seconds = time.perf_counter() - started
            for callback in self.on_step:  # before _publish forgets the finished requests
                callback(outputs, seconds)
            self._publish(outputs)
        self._enforce_deadlines()
        self._beat()

    def _refresh_tenants(self, force: bool = False) -> None:
        """Read the tenants that have a request stream, with their weights; join each new stream's group."""
        now = time.monotonic()
        if not force and now - self._tenants_read_at < self.config.tenants_refresh_seconds:
            return
        self._tenants_read_at = now
        listed = self.redis.hgetall(protocol.tenant_index(self.base_model))
        streams = {}
        for raw_tenant, raw_weight in listed.items():
            tenant = text_of(raw_tenant)
            streams[protocol.request_stream(self.base_model, tenant)] = (tenant, _weight(text_of(raw_weight)))
        for stream in streams.keys() - self.tenant_streams.keys():
            try:
                self.redis.xgroup_create(stream, protocol.CONSUMER_GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        for tenant, weight in streams.values():
            self.engine.set_tenant_weight(tenant, weight)
        self.tenant_streams = streams

    def _read_requests(self) -> None:
        """Weighted round robin over the tenant streams: each gets its share of the room, at least one.

        With no room left, a tenant that has nothing in flight may still bring in one request, so that
        the scheduler sees it (and makes room by fair share) instead of it waiting behind a backlog.
        """
        room = self.engine.config.max_num_seqs * 2 - len(self.in_flight)
        idle = not self.engine.has_unfinished()
        self._refresh_tenants(force=idle)  # an idle daemon looks every time: a new tenant waits for nothing
        if not self.tenant_streams:
            if idle:
                time.sleep(self.config.block_ms / 1000)
            return
        if room <= 0:
            busy = {flight.source for flight in self.in_flight.values()}
            newcomers = [stream for stream in self.tenant_streams if stream not in busy]
            if newcomers:
                self._read_from(newcomers, count=1, block=None)
            return
        streams = list(self.tenant_streams.items())
        turn = self._round_robin % len(streams)
        self._round_robin += 1
        streams = streams[turn:] + streams[:turn]
        total = sum(weight for _stream, (_tenant, weight) in streams)
        shares: dict[int, list[str]] = defaultdict(list)
        for stream, (_tenant, weight) in streams:
            shares[max(1, math.ceil(room * weight / total))].append(stream)
        read = sum(self._read_from(names, count=count, block=None) for count, names in shares.items())
        if read == 0 and idle:  # nothing anywhere: wait for the first arrival on any stream
            self._read_from([stream for stream, _ in streams], count=1, block=self.config.block_ms)

    def _read_from(self, streams: list[str], *, count: int, block: int | None) -> int:
        reply = self.redis.xreadgroup(
            protocol.CONSUMER_GROUP, self.engine_id, {stream: ">" for stream in streams}, count=count, block=block
        )
        read = 0
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                self._accept(text_of(entry_id), fields, deliveries=1, source=text_of(stream))
                read += 1
        return read

    def _claim_abandoned(self) -> None:
        for stream in list(self.tenant_streams):
            self._claim_abandoned_from(stream)

    def _claim_abandoned_from(self, stream: str) -> None:
        idle_ms = int(self.config.claim_idle_seconds * 1000)
        cursor = "0-0"
        while True:
            cursor, entries, *_ = self.redis.xautoclaim(
                stream, protocol.CONSUMER_GROUP, self.engine_id, idle_ms, start_id=cursor, count=100
            )
            for entry_id, fields in entries:
                entry_id = text_of(entry_id)
                if fields is None or entry_id in {f.entry_id for f in self.in_flight.values() if f.source == stream}:
                    continue
                pending = self.redis.xpending_range(stream, protocol.CONSUMER_GROUP, entry_id, entry_id, 1)
                deliveries = pending[0]["times_delivered"] if pending else 1
                log.info("claimed abandoned request entry %s of %s (delivery %d)", entry_id, stream, deliveries)
                self._accept(entry_id, fields, deliveries=deliveries, source=stream)
            if text_of(cursor) == "0-0":
                return

    def _accept(self, entry_id: str, fields: dict, deliveries: int, source: str) -> None:
        try:
            request = InferenceRequest.from_redis(fields)
        except ProtocolError as exc:
            self._dead_letter(entry_id, source, fields, f"malformed request: {exc}", None)
            return
        stream = protocol.response_stream(request.request_id)
        if deliveries > self.config.max_deliveries:
            self._dead_letter(entry_id, source, fields, f"delivered {deliveries} times without finishing", stream,
                              self._usage(request, UsageEvent.ERROR, error_code="too_many_deliveries"))
            return
        if request.deadline is not None and time.time() > request.deadline:
            self._fail(entry_id, source, stream, "deadline_exceeded", "the request's deadline passed before it could start",
                       self._usage(request, UsageEvent.DEADLINE, error_code="deadline_exceeded"))
            return
        if request.request_id in self.cancelled:  # the client left before any daemon took it
            self._write_and_ack(entry_id, source, stream, DoneEvent("cancelled", 0, 0, engine_id=self.engine_id),
                                self._usage(request, UsageEvent.CANCELLED))
            return
        sent, finished = self._already_sent(stream) if deliveries > 1 else ({}, False)
        if finished:  # the previous daemon finished it but died before the XACK
            pipe = self.redis.pipeline(transaction=False)
            _ack_and_delete(pipe, source, [entry_id])
            pipe.execute()
            return
        try:
            params = request.sampling_params()
            resumed = [sent.get(index, SentChoice()).ended_by(params.max_tokens) for index in range(params.n)]
            if sent and all(choice.finish_reason for choice in resumed):
                self._finish_resumed(entry_id, source, stream, request, resumed)
                return
            adapter = self._ensure_adapter(request)
            single = params.n == 1 and bool(resumed[0].token_ids)  # one choice resumes after its tokens
            self.engine.add_request(
                request.prompt,
                params,
                request_id=request.request_id,
                adapter=adapter,
                tenant=request.tenant_id,
                messages=request.messages,
                tools=request.tools,
                resume_token_ids=resumed[0].token_ids if single else None,
                resume_text=resumed[0].text if single else None,
                resume_choices=[(c.token_ids, c.text, c.finish_reason) for c in resumed] if sent and params.n > 1 else None,
            )
        except (RequestError, AdapterError) as exc:
            self._fail(entry_id, source, stream, exc.code, str(exc), self._usage(request, UsageEvent.ERROR, error_code=exc.code))
            return
        except (ProtocolError, TypeError, ValueError) as exc:  # bad sampling parameters; or e.g. a prompt of non-ids
            self._fail(entry_id, source, stream, "invalid_request", f"malformed request: {exc}",
                       self._usage(request, UsageEvent.ERROR, error_code="invalid_request"))
            return
        sent_tokens = sum(len(choice.token_ids) for choice in sent.values())
        self.in_flight[request.request_id] = InFlight(entry_id, source, request, stream, sent_tokens=sent_tokens)

    def _already_sent(self, stream: str) -> tuple[dict[int, SentChoice], bool]:
        """What a previous daemon streamed for each choice of this request, and whether it ended."""
        sent: dict[int, SentChoice] = {}
        for _id, fields in self.redis.xrange(stream):
            event = protocol.response_event_from_redis(fields)
            if not isinstance(event, DeltaEvent):
                return sent, True
            choice = sent.setdefault(event.index, SentChoice())
            choice.token_ids += event.token_ids
            choice.text += event.text
            choice.finish_reason = event.finish_reason or choice.finish_reason
        return sent, False

    def _finish_resumed(
        self, entry_id: str, source: str, stream: str, request: InferenceRequest, choices: list[SentChoice]
    ) -> None:
        """Every choice had ended before the previous daemon died: only the done event is missing."""
        prompt_tokens = len(self.engine.encode(request.prompt, request.messages, request.tools))
        reasons = [choice.finish_reason or "length" for choice in choices]
        completion_tokens = sum(len(choice.token_ids) for choice in choices)
        done = DoneEvent(reasons[0], prompt_tokens, completion_tokens, engine_id=self.engine_id, finish_reasons=reasons)
        self._write_and_ack(entry_id, source, stream, done,
                            self._usage(request, UsageEvent.DONE, prompt_tokens=prompt_tokens,
                                        completion_tokens=completion_tokens))

    def _ensure_adapter(self, request: InferenceRequest) -> str | None:
        """Adapters are registered under their content hash and read from the shared cache."""
        sha = request.adapter_sha256
        if not sha:
            return None
        if not self.engine.has_adapter(sha):
            self.engine.add_adapter(sha, str(cached_adapter_dir(self.config.adapter_cache_dir, sha)))
        return sha

    # ---- writing back -------------------------------------------------------------------

    def _publish(self, outputs: list[StepOutput]) -> None:
        """Every request's events of this step in one pipelined round trip."""
        if not outputs:
            return
        pipe = self.redis.pipeline(transaction=False)
        finished_entries: dict[str, list[str]] = defaultdict(list)  # source stream → entry ids
        for out in outputs:
            flight = self.in_flight.get(out.request_id)
            if flight is None:
                continue
            if out.new_token_ids:
                if flight.first_token_at is None:
                    flight.first_token_at = time.time()
                delta = DeltaEvent(out.new_text, out.new_token_ids, out.new_logprobs, index=out.index,
                                   logprob_content=out.logprob_content,
                                   finish_reason=out.finish_reason)  # set on the choice's last delta only
                pipe.xadd(flight.stream, delta.to_redis())
                flight.sent_tokens += len(out.new_token_ids)
            if out.finished:
                if out.finish_reason == "error":
                    code = out.error_code or "engine_error"
                    event: Any = ErrorEvent(code, out.error or "the request failed")
                    usage = self._usage(flight.request, UsageEvent.ERROR, error_code=code,
                                        prompt_tokens=self.engine.prompt_tokens_computed(out.request_id),
                                        cached_tokens=self.engine.prompt_tokens_cached(out.request_id),
                                        completion_tokens=out.completion_tokens)
                else:
                    ttft = flight.first_token_at - flight.request.created if flight.first_token_at and flight.request.created else None
                    reasons = out.finish_reasons or [out.finish_reason or "stop"]
                    event = DoneEvent(reasons[0], out.prompt_tokens, out.completion_tokens, ttft, self.engine_id,
                                      cached_tokens=out.cached_tokens, finish_reasons=reasons)
                    usage = self._usage(flight.request, UsageEvent.DONE, prompt_tokens=out.prompt_tokens,
                                        cached_tokens=out.cached_tokens, completion_tokens=out.completion_tokens)
                pipe.xadd(flight.stream, event.to_redis())
                _add_usage(pipe, usage)
                finished_entries[flight.source].append(flight.entry_id)
                del self.in_flight[out.request_id]
                self.engine.pop_finished(out.request_id)
            pipe.expire(flight.stream, protocol.RESPONSE_TTL_SECONDS)
        for source, entry_ids in finished_entries.items():
            _ack_and_delete(pipe, source, entry_ids)
        pipe.execute()

    def _usage(self, request: InferenceRequest, end: str, *, prompt_tokens: int = 0, cached_tokens: int = 0,
               completion_tokens: int = 0, error_code: str = "") -> UsageEvent:
        return UsageEvent.for_request(request, end=end, prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                                      completion_tokens=completion_tokens, engine_id=self.engine_id,
                                      error_code=error_code, admission=self.engine.admission_of(request.request_id))

    def _fail(self, entry_id: str, source: str, stream: str, code: str, message: str, usage: UsageEvent) -> None:
        log.info("request entry %s failed: %s", entry_id, message)
        self._write_and_ack(entry_id, source, stream, ErrorEvent(code, message), usage)

    def _write_and_ack(self, entry_id: str, source: str, stream: str, event: Any, usage: UsageEvent) -> None:
        """The request's last event, its usage and its ack, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(stream, event.to_redis())
        pipe.expire(stream, protocol.RESPONSE_TTL_SECONDS)
        _add_usage(pipe, usage)
        _ack_and_delete(pipe, source, [entry_id])
        pipe.execute()

    def _dead_letter(self, entry_id: str, source: str, fields: dict, reason: str, stream: str | None,
                     usage: UsageEvent | None = None) -> None:
        log.warning("dead-lettering request entry %s of %s: %s", entry_id, source, reason)
        pipe = self.redis.pipeline(transaction=False)
        dead = {text_of(k): text_of(v) for k, v in fields.items()}
        dead.update({"reason": reason, "entry_id": entry_id, "engine_id": self.engine_id, "at": str(time.time())})
        retention = self.config.dead_letter_retention_seconds
        dead_stream = protocol.dead_letter_stream(self.base_model)
        # Entry ids are milliseconds: MINID drops what is older than the retention period.
        pipe.xadd(dead_stream, dead, minid=str(int((time.time() - retention) * 1000)), approximate=False)
        pipe.expire(dead_stream, max(1, math.ceil(retention)))
        if stream is not None:
            pipe.xadd(stream, ErrorEvent("too_many_deliveries", f"the request could not be served: {reason}").to_redis())
            pipe.expire(stream, protocol.RESPONSE_TTL_SECONDS)
        if usage is not None:
            _add_usage(pipe, usage)
        _ack_and_delete(pipe, source, [entry_id])
        pipe.execute()

    # ---- control, deadlines, heartbeat ---------------------------------------------------------

    def _read_control(self) -> None:
        reply = self.redis.xread({protocol.CONTROL_STREAM: self._control_cursor}, count=100)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._control_cursor = text_of(entry_id)
                try:
                    event = ControlEvent.from_redis(fields)
                except ProtocolError as exc:
                    log.warning("ignoring malformed control event %s: %s", entry_id, exc)
                    continue
                self._apply_control(event)

    def _apply_control(self, event: ControlEvent) -> None:
        if event.action == ControlEvent.CANCEL and event.request_id:
            self._remember_cancel(event.request_id)
            flight = self.in_flight.pop(event.request_id, None)
            if flight is None:
                return  # not ours, or not taken yet: refused when it arrives
            prompt_tokens = self.engine.prompt_tokens_computed(event.request_id)
            cached_tokens = self.engine.prompt_tokens_cached(event.request_id)
            usage = self._usage(flight.request, UsageEvent.CANCELLED, prompt_tokens=prompt_tokens,
                                cached_tokens=cached_tokens, completion_tokens=flight.sent_tokens)
            self.engine.abort(event.request_id)  # frees its KV blocks now
            done = DoneEvent("cancelled", prompt_tokens, flight.sent_tokens, engine_id=self.engine_id,
                             cached_tokens=cached_tokens)
            self._write_and_ack(flight.entry_id, flight.source, flight.stream, done, usage)
        elif event.action == ControlEvent.ADAPTER_STAGED and event.sha256 and event.base_model in (None, self.base_model):
            try:
                if not self.engine.has_adapter(event.sha256):
                    self.engine.add_adapter(event.sha256, str(cached_adapter_dir(self.config.adapter_cache_dir, event.sha256)))
                self.engine.prefetch_adapter(event.sha256, to_device=False)
            except AdapterError as exc:
                log.warning("staged adapter %s is unusable here: %s", event.sha256, exc)
        elif event.action in (ControlEvent.ADAPTER_PINNED, ControlEvent.ADAPTER_UNPINNED) and event.sha256 \
                and event.base_model in (None, self.base_model):
            self._set_pinned(event.sha256, event.action == ControlEvent.ADAPTER_PINNED)
        elif event.action == ControlEvent.ADAPTER_DELETED and event.sha256 and self.engine.has_adapter(event.sha256):
            try:
                self.engine.remove_adapter(event.sha256)
            except AdapterError as exc:  # still serving: it goes when its requests end and it ages out
                log.info("adapter %s not evicted yet: %s", event.sha256, exc)

    def _set_pinned(self, sha: str, pinned: bool) -> None:
        """Staff pinned (or unpinned) an adapter version: a pinned one is loaded onto the device now
        and never evicted from it."""
        try:
            if pinned and not self.engine.has_adapter(sha):
                self.engine.add_adapter(sha, str(cached_adapter_dir(self.config.adapter_cache_dir, sha)))
            if self.engine.has_adapter(sha):
                self.engine.pin_adapter(sha, pinned)
        except AdapterError as exc:  # another base model's adapter, or not staged where this engine reads
            log.info("pinned adapter %s is not served here: %s", sha, exc)

    def _remember_cancel(self, request_id: str) -> None:
        """Cancelled ids are kept as long as a response stream lives, so a late arrival is refused."""
        now = time.monotonic()
        self.cancelled[request_id] = now
        while self.cancelled:
            oldest, at = next(iter(self.cancelled.items()))
            if now - at < protocol.RESPONSE_TTL_SECONDS:
                break
            del self.cancelled[oldest]

    def _enforce_deadlines(self) -> None:
        now = time.time()
        for request_id, flight in list(self.in_flight.items()):
            if flight.request.deadline is not None and now > flight.request.deadline:
                del self.in_flight[request_id]
                usage = self._usage(flight.request, UsageEvent.DEADLINE, error_code="deadline_exceeded",
                                    prompt_tokens=self.engine.prompt_tokens_computed(request_id),
                                    cached_tokens=self.engine.prompt_tokens_cached(request_id),
                                    completion_tokens=flight.sent_tokens)
                self.engine.abort(request_id)
                self._fail(flight.entry_id, flight.source, flight.stream, "deadline_exceeded",
                           "the request's deadline passed", usage)

    def _beat(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_beat < self.config.heartbeat_seconds:
            return
        self._last_beat = now
        for callback in self.on_beat:
            callback()
        snapshot = self.engine.snapshot()
        beat = Heartbeat.of(
            replace(snapshot, adapters=_beat_adapters(snapshot.adapters, now),
                    prefix_tenants=_beat_prefix_tenants(snapshot.prefix_tenants)),
            engine_id=self.engine_id,
            updated=now,
            in_flight=len(self.in_flight),
            draining=self.draining_since is not None,
            metrics_url=self.metrics_url,
        )
        key = protocol.heartbeat_key(self.engine_id)
        pipe = self.redis.pipeline(transaction=True)  # MULTI: a reader never finds the hash gone between the two
        pipe.delete(key)
        pipe.hset(key, mapping=beat.to_redis())
        pipe.expire(key, protocol.HEARTBEAT_TTL_SECONDS)
        pipe.zadd(protocol.ENGINES_KEY, {self.engine_id: now})
        pipe.xadd(
            protocol.series_stream(self.engine_id),
            {
                "t": f"{now:.3f}",
                "tokens_per_second": f"{beat.tokens_per_second:.2f}",
                "step_ms": f"{beat.step_seconds * 1000:.2f}",
                "running": beat.running,
                "waiting": beat.waiting,
                "kv_used": f"{beat.kv_blocks_used / max(1, beat.kv_blocks_total):.4f}",
            },
            maxlen=protocol.SERIES_MAXLEN,
            approximate=True,
        )
        pipe.expire(protocol.series_stream(self.engine_id), 3600)
        held: dict[str, list[str]] = defaultdict(list)
        for flight in self.in_flight.values():
            held[flight.source].append(flight.entry_id)
        for source, entry_ids in held.items():  # keep our entries' idle time low so no other daemon claims them
            pipe.xclaim(source, protocol.CONSUMER_GROUP, self.engine_id, 0, entry_ids, justid=True)
        pipe.execute()

    def _stream_tail(self, stream: str) -> str:
        last = self.redis.xrevrange(stream, count=1)
        return text_of(last[0][0]) if last else "0-0"


def _add_usage(pipe: Any, usage: UsageEvent) -> None:
    pipe.xadd(protocol.USAGE_STREAM, usage.to_redis(), maxlen=USAGE_STREAM_MAXLEN, approximate=True)


def _ack_and_delete(pipe: Any, source: str, entry_ids: list[str]) -> None:
    """An ended request's entry leaves its stream: Redis keeps only work in flight."""
    pipe.xack(source, protocol.CONSUMER_GROUP, *entry_ids)
    pipe.xdel(source, *entry_ids)


def _weight(text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        return 1.0
    return weight if math.isfinite(weight) and weight > 0 else 1.0


def _beat_adapters(adapters: list[dict], now: float) -> list[dict]:
    """What the ops page needs, bounded: adapters resident or failed, then the most recently used others."""
    def recent(row: dict) -> bool:
        return row["tier"] in ("gpu", "host", "loading", "failed") or (
            row.get("last_used") is not None and now - row["last_used"] < BEAT_ADAPTERS_RECENT_SECONDS
        )

    shown = [row for row in adapters if recent(row)]
    shown.sort(key=lambda row: (row["tier"] not in ("gpu", "loading", "failed"), -(row.get("last_used") or 0)))
    return shown[:BEAT_ADAPTERS_MAX]


def _beat_prefix_tenants(tenants: dict[str, list[int]]) -> dict[str, list[int]]:
    """The tenants with the most prompt tokens, at most BEAT_PREFIX_TENANTS_MAX (the totals still count them all)."""
    busiest = sorted(tenants.items(), key=lambda item: (-item[1][0], item[0]))[:BEAT_PREFIX_TENANTS_MAX]
    return dict(busiest)


def install_signal_handlers(service: EngineService) -> None:
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
