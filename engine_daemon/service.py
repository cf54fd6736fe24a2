"""The engine daemon's Redis side: consume requests, stream tokens, obey control events, beat.

One loop on one thread owns the engine (DESIGN.md, "Processes and the path of one request"):

    control events → new requests (XREADGROUP) → engine.step() → one pipelined write of every
    request's new tokens, ``done`` events and XACKs → deadlines → heartbeat (once a second)

At-least-once delivery: a request is XACKed only once it has ended. Entries that a dead daemon
held are XAUTOCLAIMed after ``claim_idle_seconds``; the tokens it had already streamed are read
back from the response stream and the request resumes after them, so a client never sees a
token twice. A live daemon keeps its own entries fresh (XCLAIM JUSTID) so nobody steals them.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from engine_daemon import protocol
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
    text_of,
)
from engine_daemon.sampling import SamplingParams

log = logging.getLogger("lorafleet.daemon")


@dataclass
class ServiceConfig:
    redis_url: str
    adapter_cache_dir: Path
    engine_id: str = ""
    claim_idle_seconds: float = 30.0  # an entry idle this long belongs to a dead daemon
    max_deliveries: int = 3  # past this many deliveries an entry is dead-lettered
    drain_seconds: float = 30.0  # SIGTERM: how long running requests may take to finish
    block_ms: int = 50  # how long an idle daemon waits for new requests per read
    heartbeat_seconds: float = 1.0


@dataclass
class InFlight:
    entry_id: str
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
        self.request_stream = protocol.request_stream(self.base_model)
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
        try:
            self.redis.xgroup_create(self.request_stream, protocol.CONSUMER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._control_cursor = self._stream_tail(protocol.CONTROL_STREAM)
        self.redis.hset(protocol.BASE_MODELS_KEY, self.base_model, json.dumps(self.engine.descriptor.to_dict()))
        self._beat(force=True)
        log.info("engine %s serves %s from %s", self.engine_id, self.base_model, self.request_stream)

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

    def _read_requests(self) -> None:
        room = self.engine.config.max_num_seqs * 2 - len(self.in_flight)
        if room <= 0:
            return
        block = None if self.engine.has_unfinished() else self.config.block_ms
        reply = self.redis.xreadgroup(
            protocol.CONSUMER_GROUP, self.engine_id, {self.request_stream: ">"}, count=room, block=block
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._accept(text_of(entry_id), fields, deliveries=1)

    def _claim_abandoned(self) -> None:
        idle_ms = int(self.config.claim_idle_seconds * 1000)
        cursor = "0-0"
        while True:
            cursor, entries, *_ = self.redis.xautoclaim(
                self.request_stream, protocol.CONSUMER_GROUP, self.engine_id, idle_ms, start_id=cursor, count=100
            )
            for entry_id, fields in entries:
                entry_id = text_of(entry_id)
                if fields is None or entry_id in {f.entry_id for f in self.in_flight.values()}:
                    continue
                pending = self.redis.xpending_range(self.request_stream, protocol.CONSUMER_GROUP, entry_id, entry_id, 1)
                deliveries = pending[0]["times_delivered"] if pending else 1
                log.info("claimed abandoned request entry %s (delivery %d)", entry_id, deliveries)
                self._accept(entry_id, fields, deliveries=deliveries)
            if text_of(cursor) == "0-0":
                return

    def _accept(self, entry_id: str, fields: dict, deliveries: int) -> None:
        try:
            request = InferenceRequest.from_redis(fields)
        except ProtocolError as exc:
            self._dead_letter(entry_id, fields, f"malformed request: {exc}", None)
            return
        stream = protocol.response_stream(request.request_id)
        if deliveries > self.config.max_deliveries:
            self._dead_letter(entry_id, fields, f"delivered {deliveries} times without finishing", stream)
            return
        if request.deadline is not None and time.time() > request.deadline:
            self._fail(entry_id, stream, "deadline_exceeded", "the request's deadline passed before it could start")
            return
        if request.request_id in self.cancelled:  # the client left before any daemon took it
            self._write_and_ack(entry_id, stream, DoneEvent("cancelled", 0, 0, engine_id=self.engine_id))
            return
        sent_ids, sent_text, finished = self._already_sent(stream) if deliveries > 1 else ([], "", False)
        if finished:  # the previous daemon finished it but died before the XACK
            self.redis.xack(self.request_stream, protocol.CONSUMER_GROUP, entry_id)
            return
        try:
            params = SamplingParams(**request.sampling)
            if sent_ids and len(sent_ids) >= params.max_tokens:
                self._finish_resumed(entry_id, stream, request, sent_ids)
                return
            adapter = self._ensure_adapter(request)
            self.engine.add_request(
                request.prompt,
                params,
                request_id=request.request_id,
                adapter=adapter,
                tenant=request.tenant_id,
                messages=request.messages,
                resume_token_ids=sent_ids or None,
                resume_text=sent_text if sent_ids else None,
            )
        except RequestError as exc:
            self._fail(entry_id, stream, exc.code, str(exc))
            return
        except AdapterError as exc:
            self._fail(entry_id, stream, "adapter_unavailable", str(exc))
            return
        except (TypeError, ValueError) as exc:
            self._fail(entry_id, stream, "invalid_request", f"bad sampling parameters: {exc}")
            return
        self.in_flight[request.request_id] = InFlight(entry_id, request, stream, sent_tokens=len(sent_ids))

    def _already_sent(self, stream: str) -> tuple[list[int], str, bool]:
        """Token ids and text a previous daemon streamed for this request, and whether it ended."""
        token_ids: list[int] = []
        texts: list[str] = []
        for _id, fields in self.redis.xrange(stream):
            event = protocol.response_event_from_redis(fields)
            if not isinstance(event, DeltaEvent):
                return token_ids, "".join(texts), True
            token_ids += event.token_ids
            texts.append(event.text)
        return token_ids, "".join(texts), False

    def _finish_resumed(self, entry_id: str, stream: str, request: InferenceRequest, sent_ids: list[int]) -> None:
        prompt_tokens = len(self.engine.encode(request.prompt, request.messages))
        done = DoneEvent("length", prompt_tokens, len(sent_ids), engine_id=self.engine_id)
        self._write_and_ack(entry_id, stream, done)

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
        finished_entries = []
        for out in outputs:
            flight = self.in_flight.get(out.request_id)
            if flight is None:
                continue
            if out.new_token_ids:
                if flight.first_token_at is None:
                    flight.first_token_at = time.time()
                pipe.xadd(flight.stream, DeltaEvent(out.new_text, out.new_token_ids, out.new_logprobs).to_redis())
                flight.sent_tokens += len(out.new_token_ids)
            if out.finished:
                if out.finish_reason == "error":
                    event: Any = ErrorEvent("adapter_unavailable" if "adapter" in (out.error or "") else "engine_error",
                                            out.error or "the request failed")
                else:
                    ttft = flight.first_token_at - flight.request.created if flight.first_token_at and flight.request.created else None
                    event = DoneEvent(out.finish_reason or "stop", out.prompt_tokens, out.completion_tokens, ttft, self.engine_id)
                pipe.xadd(flight.stream, event.to_redis())
                finished_entries.append(flight.entry_id)
                del self.in_flight[out.request_id]
                self.engine.pop_finished(out.request_id)
            pipe.expire(flight.stream, protocol.RESPONSE_TTL_SECONDS)
        if finished_entries:
            pipe.xack(self.request_stream, protocol.CONSUMER_GROUP, *finished_entries)
        pipe.execute()

    def _fail(self, entry_id: str, stream: str, code: str, message: str) -> None:
        log.info("request entry %s failed: %s", entry_id, message)
        self._write_and_ack(entry_id, stream, ErrorEvent(code, message))

    def _write_and_ack(self, entry_id: str, stream: str, event: Any) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(stream, event.to_redis())
        pipe.expire(stream, protocol.RESPONSE_TTL_SECONDS)
        pipe.xack(self.request_stream, protocol.CONSUMER_GROUP, entry_id)
        pipe.execute()

    def _dead_letter(self, entry_id: str, fields: dict, reason: str, stream: str | None) -> None:
        log.warning("dead-lettering request entry %s: %s", entry_id, reason)
        pipe = self.redis.pipeline(transaction=False)
        dead = {text_of(k): text_of(v) for k, v in fields.items()}
        dead.update({"reason": reason, "entry_id": entry_id, "engine_id": self.engine_id, "at": str(time.time())})
        pipe.xadd(protocol.dead_letter_stream(self.base_model), dead, maxlen=10000, approximate=True)
        if stream is not None:
            pipe.xadd(stream, ErrorEvent("too_many_deliveries", f"the request could not be served: {reason}").to_redis())
            pipe.expire(stream, protocol.RESPONSE_TTL_SECONDS)
        pipe.xack(self.request_stream, protocol.CONSUMER_GROUP, entry_id)
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
            seq = self.engine.sequences.get(event.request_id)
            prompt_tokens = len(seq.prompt_ids) if seq is not None else 0
            self.engine.abort(event.request_id)  # frees its KV blocks now
            done = DoneEvent("cancelled", prompt_tokens, flight.sent_tokens, engine_id=self.engine_id)
            self._write_and_ack(flight.entry_id, flight.stream, done)
        elif event.action == ControlEvent.ADAPTER_STAGED and event.sha256 and event.base_model in (None, self.base_model):
            try:
                if not self.engine.has_adapter(event.sha256):
                    self.engine.add_adapter(event.sha256, str(cached_adapter_dir(self.config.adapter_cache_dir, event.sha256)))
                self.engine.prefetch_adapter(event.sha256, to_device=False)
            except AdapterError as exc:
                log.warning("staged adapter %s is unusable here: %s", event.sha256, exc)
        elif event.action == ControlEvent.ADAPTER_DELETED and event.sha256 and self.engine.has_adapter(event.sha256):
            try:
                self.engine.remove_adapter(event.sha256)
            except AdapterError as exc:  # still serving: it goes when its requests end and it ages out
                log.info("adapter %s not evicted yet: %s", event.sha256, exc)

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
                self.engine.abort(request_id)
                self._fail(flight.entry_id, flight.stream, "deadline_exceeded", "the request's deadline passed")

    def _beat(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_beat < self.config.heartbeat_seconds:
            return
        self._last_beat = now
        for callback in self.on_beat:
            callback()
        snap = self.engine.snapshot()
        beat = Heartbeat(
            engine_id=self.engine_id,
            base_model=self.base_model,
            device=snap["device"],
            dtype=snap["dtype"],
            lora_dtype=snap["lora_dtype"],
            started=snap["started"],
            updated=now,
            memory=snap["memory"],
            kv_blocks_total=snap["kv_blocks_total"],
            kv_blocks_used=snap["kv_blocks_used"],
            running=snap["running"],
            waiting=snap["waiting"],
            in_flight=len(self.in_flight),
            steps=snap["steps"],
            prompt_tokens=snap["prompt_tokens"],
            generated_tokens=snap["generated_tokens"],
            preemptions=snap["preemptions"],
            tokens_per_second=snap["tokens_per_second"],
            step_seconds=snap["step_seconds"],
            lora_share=snap["lora_share"],
            max_adapters_in_step=snap["max_adapters_in_step"],
            multi_adapter_steps=snap["multi_adapter_steps"],
            adapters=snap["adapters"],
            draining=self.draining_since is not None,
            metrics_url=self.metrics_url,
        )
        key = protocol.heartbeat_key(self.engine_id)
        pipe = self.redis.pipeline(transaction=False)
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
        if self.in_flight:  # keep our entries' idle time low so no other daemon claims them
            pipe.xclaim(
                self.request_stream,
                protocol.CONSUMER_GROUP,
                self.engine_id,
                0,
                [f.entry_id for f in self.in_flight.values()],
                justid=True,
            )
        pipe.execute()

    def _stream_tail(self, stream: str) -> str:
        last = self.redis.xrevrange(stream, count=1)
        return text_of(last[0][0]) if last else "0-0"


def install_signal_handlers(service: EngineService) -> None:
    signal.signal(signal.SIGTERM, service.request_stop)
    signal.signal(signal.SIGINT, service.request_stop)
