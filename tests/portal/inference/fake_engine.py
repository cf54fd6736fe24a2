"""A stand-in engine daemon on real Redis, speaking only the wire protocol: it beats, registers its base
model and answers each request with the events a test scripts. The real daemon is in tests/e2e."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine_daemon import protocol
from engine_daemon.peft_format import describe_base_model
from engine_daemon.protocol import (
    ControlEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    Heartbeat,
    InferenceRequest,
)

Script = Callable[[InferenceRequest], list[Any]]  # events, or a float: seconds to sleep before the next one


def words(request: InferenceRequest, texts=("Ahoy", " there", ",", " matey")) -> list[Any]:
    """One token per text; finish "length" when max_tokens cuts it, else "stop". Of the 7 prompt tokens,
    4 came from the prefix cache."""
    limit = request.sampling_params().max_tokens
    chosen = list(texts)[:limit]
    events: list[Any] = [DeltaEvent(text, [100 + i]) for i, text in enumerate(chosen)]
    reason = "length" if limit <= len(texts) else "stop"
    return events + [DoneEvent(reason, 7, len(chosen), 0.01, "fake", cached_tokens=4)]


def choices(*texts_by_choice: list[str], prompt_tokens: int = 7) -> Script:
    """Choice i says ``texts_by_choice[i]``, one token a text, interleaved as an engine's steps are; each
    token has a logprob entry when the request asks (its k alternatives are the token and "alt1", ...),
    and each choice's last delta carries its finish reason, "stop"."""

    def script(request: InferenceRequest) -> list[Any]:
        sampling = request.sampling_params()
        events: list[Any] = []
        for step in range(max(len(texts) for texts in texts_by_choice)):
            for index, texts in enumerate(texts_by_choice):
                if step < len(texts):
                    entries = [logprob_entry(texts[step], step, sampling.top_logprobs)] if sampling.logprobs else None
                    events.append(DeltaEvent(texts[step], [100 + step], index=index, logprob_content=entries,
                                             finish_reason="stop" if step == len(texts) - 1 else None))
        tokens = sum(len(texts) for texts in texts_by_choice)
        return events + [DoneEvent("stop", prompt_tokens, tokens, 0.01, "fake",
                                   finish_reasons=["stop"] * len(texts_by_choice))]

    return script


def logprob_entry(token: str, step: int, top: int) -> dict[str, Any]:
    """The engine's entry for one token, in OpenAI's chat shape: the token at -0.1 * (step + 1)."""
    logprob = -0.1 * (step + 1)
    alternatives = [(token, logprob)] + [(f"alt{j}", logprob - j) for j in range(1, top)]
    return {"token": token, "bytes": list(token.encode()), "logprob": logprob,
            "top_logprobs": [{"token": t, "bytes": list(t.encode()), "logprob": lp} for t, lp in alternatives[:top]]}


@dataclass
class FakeEngine:
    client: Any
    base_model: str = "random:tiny"
    engine_id: str = "fake-engine"
    script: Script = words
    draining: bool = False
    requests: list[InferenceRequest] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, **overrides: Any) -> None:
        now = time.time()
        beat = Heartbeat(engine_id=self.engine_id, base_model=self.base_model, device="cpu", dtype="float32",
                         started=now, updated=now, draining=self.draining, **overrides)
        key = protocol.heartbeat_key(self.engine_id)
        self.client.hset(key, mapping=beat.to_redis())
        self.client.expire(key, protocol.HEARTBEAT_TTL_SECONDS)
        self.client.zadd(protocol.ENGINES_KEY, {self.engine_id: now})

    def register(self) -> None:
        import json

        descriptor = describe_base_model(self.base_model).to_dict()
        self.client.hset(protocol.BASE_MODELS_KEY, self.base_model, json.dumps(descriptor))

    def __enter__(self) -> FakeEngine:
        self.register()
        self.beat()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        cursors: dict[str, str] = {}  # every tenant's request stream, as the index lists them
        control_cursor, last_beat = "0-0", 0.0
        while not self._stop.is_set():
            if time.time() - last_beat > 0.5:
                self.beat()
                last_beat = time.time()
            for tenant in self.client.hkeys(protocol.tenant_index(self.base_model)):
                cursors.setdefault(protocol.request_stream(self.base_model, protocol.text_of(tenant)), "0-0")
            if not cursors:
                time.sleep(0.02)
                continue
            reply = self.client.xread(cursors, count=10, block=20)
            for name, entries in reply or []:
                for entry_id, fields in entries:
                    cursors[protocol.text_of(name)] = entry_id
                    request = InferenceRequest.from_redis(fields)
                    self.requests.append(request)
                    control_cursor = self._answer(request, control_cursor)

    def _answer(self, request: InferenceRequest, control_cursor: str) -> str:
        out = protocol.response_stream(request.request_id)
        for item in self.script(request):
            if isinstance(item, int | float):
                time.sleep(item)
                continue
            for _name, entries in self.client.xread({protocol.CONTROL_STREAM: control_cursor}) or []:
                for entry_id, fields in entries:
                    control_cursor = entry_id
                    event = ControlEvent.from_redis(fields)
                    if event.action == ControlEvent.CANCEL:
                        self.cancels.append(event.request_id)
            if request.request_id in self.cancels:
                self.client.xadd(out, DoneEvent("cancelled", 0, 0).to_redis())
                return control_cursor
            self.client.xadd(out, item.to_redis())
        return control_cursor


def error(code: str, message: str = "the engine says no") -> Script:
    return lambda request: [ErrorEvent(code, message)]
