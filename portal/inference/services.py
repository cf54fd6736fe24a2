"""The serving path's portal side: admit a request, hand it to the engines over Redis, relay what comes back.

One ``Completion`` per request::

    completion = Completion(key=key, tenant=tenant, kind=CHAT)
    await completion.start(params)        # resolve the model, check engines and limits, XADD the request
    event = await completion.next_event()  # DeltaEvent ... DoneEvent; an engine error raises InferenceError
    await completion.end(Usage.Status.OK)  # record usage, settle the token reservation

Every request that passed authentication and the request-rate limit ends in exactly one ``end``,
and so in exactly one Usage record: served, refused (400, 404, 503), failed, timed out or
cancelled. A client that goes away cancels its request on the engine (a ``cancel`` control event).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections import deque
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings

from engine_daemon import protocol
from engine_daemon.protocol import (
    ControlEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    InferenceRequest,
    ProtocolError,
)
from portal.adapters.errors import AdapterRejected
from portal.adapters.selectors import ResolvedModel, adapter_resolve_for_request
from portal.adapters.staging import CONTROL_STREAM_MAXLEN
from portal.api_keys.errors import ApiKeyError
from portal.api_keys.models import Scope, TenantAPIKey
from portal.api_keys.services import api_key_authenticate_header
from portal.common.errors import NOT_FOUND
from portal.common.redis import redis_client
from portal.inference.engines import base_models_sync, engine_serving, engines_live
from portal.inference.errors import InferenceError
from portal.inference.params import CHAT, CompletionParams
from portal.inference.ratelimits import (
    rate_limit_request,
    rate_limit_tokens_reserve,
    rate_limit_tokens_settle,
)
from portal.tenants.models import Tenant
from portal.usage.models import Usage
from portal.usage.services import usage_record

log = logging.getLogger(__name__)

# How long past its deadline the portal still waits for the engine's own deadline_exceeded error.
DEADLINE_GRACE_SECONDS = 5.0
# One blocking read waits at most this long, so that the deadline is looked at regularly.
READ_BLOCK_SECONDS = 5.0
# Request streams are trimmed to about this many entries (acknowledged entries are never read again).
REQUEST_STREAM_MAXLEN = 100_000

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, redis.asyncio.Redis]] = (
    weakref.WeakKeyDictionary()
)


def async_redis() -> redis.asyncio.Redis:
    """The asyncio Redis client of the running event loop (a client's connections belong to one loop)."""
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    url = settings.REDIS_URL
    if url not in per_loop:
        per_loop[url] = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=5, socket_timeout=READ_BLOCK_SECONDS + 10, health_check_interval=30
        )
    return per_loop[url]


async def _cancellable(read: Coroutine[Any, Any, Any]) -> Any:
    """Await a Redis read so that cancelling the caller always cancels it at once.

    redis-py's asyncio client (8.1) sometimes swallows a cancellation that arrives just as a reply
    is read (measured: 2 of 30 cancelled blocking XREADs carried on), and a client that has gone away
    would then keep its request running. The read runs in its own task behind a shield: the caller
    is cancelled at once, and the read is cancelled (or ends within its block time).
    """
    task = asyncio.ensure_future(read)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(lambda done: done.cancelled() or done.exception())  # nobody waits for it now
        raise


def redis_unavailable(exc: Exception) -> InferenceError:
    return InferenceError(f"the request queue (Redis) is unreachable: {exc}; try again shortly",
                          code="engine_unavailable")


async def inference_admit(*, authorization: str | None) -> tuple[TenantAPIKey, Tenant]:
    """Authenticate an ``inference`` key and take one request from its requests-per-minute allowance."""
    try:
        key, tenant = await sync_to_async(api_key_authenticate_header)(authorization=authorization,
                                                                        scope=Scope.INFERENCE)
    except ApiKeyError as exc:
        raise InferenceError.from_application_error(exc) from None
    try:
        await rate_limit_request(async_redis(), key_id=key.pk, requests_per_minute=tenant.requests_per_minute)
    except redis.RedisError as exc:
        raise redis_unavailable(exc) from None
    return key, tenant


def model_resolve(*, tenant: Tenant, model: str) -> ResolvedModel:
    """``adapter_resolve_for_request``; a name it does not know may be a base model that a daemon has just
    registered, so the daemons' registrations are synced once before the name is called unknown."""
    try:
        return adapter_resolve_for_request(tenant=tenant, model=model)
    except AdapterRejected as exc:
        if exc.code != NOT_FOUND:
            raise InferenceError.from_application_error(exc, param="model") from None
        try:
            synced = base_models_sync(redis_client())
        except redis.RedisError:
            synced = []
        if model not in {m.name for m in synced}:
            raise InferenceError.from_application_error(exc, param="model") from None
    try:
        return adapter_resolve_for_request(tenant=tenant, model=model)
    except AdapterRejected as exc:
        raise InferenceError.from_application_error(exc, param="model") from None


class Completion:
    """One request on its way through the engines; see the module docstring."""

    def __init__(self, *, key: TenantAPIKey, tenant: Tenant, kind: str) -> None:
        self.key = key
        self.tenant = tenant
        self.kind = kind
        self.request_id = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex
        self.arrived = time.time()
        self._clock = time.monotonic()
        self.params: CompletionParams | None = None
        self.resolved: ResolvedModel | None = None
        self.deadline: float | None = None
        self.submitted = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None
        self.first_token_after: float | None = None  # seconds from arrival to the first token
        self.reserved_tokens = 0
        self.ended = False
        self._cursor = "0-0"
        self._events: deque[DeltaEvent | DoneEvent | ErrorEvent] = deque()

    @property
    def model_id(self) -> str:
        """The model served, as responses name it: ``name@N`` or the base model's name."""
        if self.resolved is not None:
            return self.resolved.model_id
        return self.params.model if self.params else ""

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    # ---- admission -------------------------------------------------------------------------

    async def start(self, params: CompletionParams) -> None:
        self.params = params
        self.resolved = await sync_to_async(model_resolve)(tenant=self.tenant, model=params.model)
        base_model = self.resolved.base_model.name
        client = async_redis()
        try:
            if not engine_serving(await engines_live(client, base_model=base_model)):
                raise InferenceError(
                    f"no engine is serving {base_model} right now; try again shortly (operators: start one with "
                    f"python -m engine_daemon serve --model {base_model})",
                    code="engine_unavailable",
                )
            self.reserved_tokens = await rate_limit_tokens_reserve(
                client, key_id=self.key.pk, tokens_per_minute=self.tenant.tokens_per_minute,
                tokens=params.max_tokens + params.prompt_token_estimate(),
            )
            self.deadline = self.arrived + settings.LORAFLEET_REQUEST_TIMEOUT
            request = InferenceRequest(
                request_id=self.request_id,
                tenant_id=str(self.tenant.pk),
                key_id=str(self.key.pk),
                base_model=base_model,
                messages=params.messages,
                prompt=params.prompt,
                adapter=self.resolved.adapter_name,
                adapter_sha256=self.resolved.adapter_sha256,
                sampling=params.sampling(),
                deadline=self.deadline,
                created=self.arrived,
            )
            await client.xadd(protocol.request_stream(base_model), request.to_redis(),
                              maxlen=REQUEST_STREAM_MAXLEN, approximate=True)
        except redis.RedisError as exc:
            raise redis_unavailable(exc) from None
        self.submitted = True

    # ---- the engine's answer ---------------------------------------------------------------

    async def next_event(self) -> DeltaEvent | DoneEvent:
        """The next delta, or the done event; raises InferenceError for an engine error or a passed deadline."""
        while not self._events:
            remaining = self.deadline + DEADLINE_GRACE_SECONDS - time.time()
            if remaining <= 0:
                raise InferenceError(
                    f"the request did not finish within {settings.LORAFLEET_REQUEST_TIMEOUT:g} s; the engines are "
                    "busy or down: try again later, or ask for fewer tokens", code="deadline_exceeded",
                )
            stream = protocol.response_stream(self.request_id)
            try:
                reply = await _cancellable(async_redis().xread(
                    {stream: self._cursor}, count=256, block=max(1, int(min(remaining, READ_BLOCK_SECONDS) * 1000))
                ))
            except redis.RedisError as exc:
                raise redis_unavailable(exc) from None
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    self._cursor = entry_id
                    try:
                        self._events.append(protocol.response_event_from_redis(fields))
                    except ProtocolError as exc:
                        raise InferenceError(f"the engine sent a malformed event: {exc}", code="engine_error") from None
        event = self._events.popleft()
        if isinstance(event, ErrorEvent):
            raise InferenceError.from_engine(event.code, event.message, prompt_param=self.params.prompt_param)
        if isinstance(event, DeltaEvent):
            if event.token_ids and self.first_token_after is None:
                self.first_token_after = time.monotonic() - self._clock
            self.completion_tokens += len(event.token_ids)
            self.text_parts.append(event.text)
        else:
            self.prompt_tokens = event.prompt_tokens
            self.completion_tokens = event.completion_tokens
            self.finish_reason = event.finish_reason
        return event

    async def run_to_end(self) -> DoneEvent:
        while True:
            event = await self.next_event()
            if isinstance(event, DoneEvent):
                return event

    # ---- the end ----------------------------------------------------------------------------

    async def end(self, status: str, error_code: str = "") -> None:
        """Record usage and settle the token reservation; the first call wins. A request that did not end on
        the engine (cancelled, timed out) is cancelled there, which frees its KV cache at once."""
        if self.ended:
            return
        self.ended = True
        client = async_redis()
        try:
            if self.submitted and self.finish_reason is None and status in (Usage.Status.CANCELLED,
                                                                             Usage.Status.TIMEOUT):
                await client.xadd(protocol.CONTROL_STREAM,
                                  ControlEvent(action=ControlEvent.CANCEL, request_id=self.request_id).to_redis(),
                                  maxlen=CONTROL_STREAM_MAXLEN, approximate=True)
            if self.reserved_tokens:
                await rate_limit_tokens_settle(client, key_id=self.key.pk,
                                               tokens_per_minute=self.tenant.tokens_per_minute,
                                               reserved=self.reserved_tokens, used=self.tokens_used())
        except redis.RedisError as exc:  # the engine's deadline ends the request; the bucket refills
            log.warning("could not cancel or settle request %s: %s", self.request_id, exc)
        await sync_to_async(self._record)(status, error_code)

    def tokens_used(self) -> int:
        if self.finish_reason is not None or not self.submitted:
            return self.prompt_tokens + self.completion_tokens
        # Ended early: the engine has read the prompt if it produced anything.
        prompt = self.params.prompt_token_estimate() if self.completion_tokens else 0
        return prompt + self.completion_tokens

    def _record(self, status: str, error_code: str) -> None:
        resolved = self.resolved
        usage_record(
            tenant=self.tenant,
            api_key=self.key,
            request_id=self.request_id,
            model=self.params.model if self.params else "",
            base_model=resolved.base_model if resolved else None,
            adapter_version=resolved.version if resolved else None,
            status=status,
            error_code=error_code,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            time_to_first_token=self.first_token_after,
            total_time=time.monotonic() - self._clock,
            stream=bool(self.params and self.params.stream),
            created=datetime.fromtimestamp(self.arrived, tz=UTC),
        )


def status_for_error(exc: InferenceError) -> str:
    return Usage.Status.TIMEOUT if exc.code == "deadline_exceeded" else Usage.Status.ERROR
