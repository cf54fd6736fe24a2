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
import contextlib
import logging
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

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
from portal.inference.params import CHAT, CompletionParams, prompt_token_floor
from portal.inference.ratelimits import (
    Limit,
    in_flight_admit,
    in_flight_release,
    key_limit,
    rate_limit_requests,
    rate_limit_tokens_reserve_all,
    rate_limit_tokens_settle_all,
    tenant_limit,
)
from portal.inference.responses import ResponseReader, ResponsesUnavailable, Subscription
from portal.inference.turns import FairTurns
from portal.tenants.models import Tenant
from portal.usage.models import Usage
from portal.usage.services import usage_record

log = logging.getLogger(__name__)

# How long past its deadline the portal still waits for the engine's own deadline_exceeded error.
DEADLINE_GRACE_SECONDS = 5.0
# The asyncio client's pool: commands past this many at once wait for a connection, up to the timeout.
# Only a stuck pool waits that long: an unreachable Redis fails when connecting.
REDIS_POOL_CONNECTIONS = 64
REDIS_POOL_TIMEOUT_SECONDS = 60.0

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, redis.asyncio.Redis]] = (
    weakref.WeakKeyDictionary()
)
_readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, ResponseReader]] = (
    weakref.WeakKeyDictionary()
)
_usage_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def async_redis() -> redis.asyncio.Redis:
    """The asyncio Redis client of the running event loop (a client's connections belong to one loop).

    Its pool is bounded and blocking: a burst of requests waits for a connection instead of failing with
    "Too many connections", and the commands that end a request (settle, cancel) wait too. No command on it
    blocks: waiting for the engine's answer takes no connection from it (``response_reader``).
    """
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    url = settings.REDIS_URL
    if url not in per_loop:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_POOL_CONNECTIONS, timeout=REDIS_POOL_TIMEOUT_SECONDS,
            socket_connect_timeout=5, socket_timeout=10, health_check_interval=30,
        )
        per_loop[url] = redis.asyncio.Redis.from_pool(pool)
    return per_loop[url]


def response_reader() -> ResponseReader:
    """The running event loop's reader of the response streams its requests wait on (``responses``)."""
    per_loop = _readers.setdefault(asyncio.get_running_loop(), {})
    url = settings.REDIS_URL
    if url not in per_loop:
        per_loop[url] = ResponseReader(url)
    return per_loop[url]


def usage_write_turn() -> contextlib.AbstractAsyncContextManager:
    """Where this process's ending requests wait to write their usage rows, on SQLite.

    SQLite lets one writer in at a time and has the others poll for its lock, giving up after its
    timeout: a burst of a thousand ends spends its time polling, and the last ones fail. Queued here,
    in order, each finds the lock free. Other databases take concurrent writers: no turn there.
    """
    if not settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        return contextlib.nullcontext()
    return _usage_turns.setdefault(asyncio.get_running_loop(), asyncio.Lock())


_db_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FairTurns] = weakref.WeakKeyDictionary()


def serving_db(function: Callable[..., Any], *, owner: Hashable) -> Callable[..., Any]:
    """A database call of the serving path: at most LORAFLEET_PORTAL_DB_CONNECTIONS at once per process, in
    fair turns by ``owner`` (an API key, a tenant).

    Django gives each ASGI request a thread, and each thread its own connection, held until the request
    ends: a thousand open streams would be a thousand connections, past PostgreSQL's limit. So the
    serving path's calls take turns for a slot, round robin by owner so that one tenant's backlog never
    delays another's, and each gives its connection back when it returns.
    """

    def closing(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        finally:  # this thread's connections back: the request may stream for minutes yet
            for connection in connections.all(initialized_only=True):
                if not connection.in_atomic_block:  # a caller's transaction (a test's) keeps its own
                    connection.close()

    async def call(*args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        turns = _db_turns.get(loop)
        if turns is None:
            turns = _db_turns[loop] = FairTurns(settings.LORAFLEET_PORTAL_DB_CONNECTIONS)
        async with turns.turn(owner):
            return await sync_to_async(closing)(*args, **kwargs)

    return call


def key_owner(authorization: str | None) -> str:
    """Whose turn a key check is, before the key is known: the bearer token's public prefix."""
    return (authorization or "").strip()[:24]


def redis_unavailable(exc: Exception) -> InferenceError:
    return InferenceError(f"the request queue (Redis) is unreachable: {exc}; try again shortly",
                          code="engine_unavailable")


async def inference_admit(*, authorization: str | None) -> tuple[TenantAPIKey, Tenant]:
    """Authenticate an ``inference`` key and take one request from its own and its tenant's requests-per-minute
    allowances (both or neither)."""
    try:
        key, tenant = await serving_db(api_key_authenticate_header, owner=key_owner(authorization))(
            authorization=authorization,
                                                                        scope=Scope.INFERENCE)
    except ApiKeyError as exc:
        raise InferenceError.from_application_error(exc) from None
    try:
        await rate_limit_requests(async_redis(), limits=request_limits(key=key, tenant=tenant))
    except redis.RedisError as exc:
        raise redis_unavailable(exc) from None
    return key, tenant


def request_limits(*, key: TenantAPIKey, tenant: Tenant) -> list[Limit]:
    """The tenant's requests per minute (all its keys together) and the key's own."""
    return [tenant_limit(tenant_id=tenant.pk, slug=tenant.slug, per_minute=tenant.requests_per_minute),
            key_limit(key_id=key.pk, per_minute=key.requests_per_minute)]


def token_limits(*, key: TenantAPIKey, tenant: Tenant) -> list[Limit]:
    """The tenant's tokens per minute (all its keys together) and the key's own."""
    return [tenant_limit(tenant_id=tenant.pk, slug=tenant.slug, per_minute=tenant.tokens_per_minute),
            key_limit(key_id=key.pk, per_minute=key.tokens_per_minute)]


async def inference_tokens_reserve(client: redis.asyncio.Redis, *, key: TenantAPIKey, tenant: Tenant,
                                   tokens: int) -> int:
    """Reserve a request's worst case from its key's and its tenant's tokens per minute (both or neither);
    returns what to settle when it ends."""
    return await rate_limit_tokens_reserve_all(client, limits=token_limits(key=key, tenant=tenant), tokens=tokens)


async def inference_tokens_settle(client: redis.asyncio.Redis, *, key: TenantAPIKey, tenant: Tenant, reserved: int,
                                  used: int) -> None:
    """Replace the reservation by what the request used, for the key and the tenant."""
    await rate_limit_tokens_settle_all(client, limits=token_limits(key=key, tenant=tenant), reserved=reserved,
                                       used=used)


async def inference_in_flight_admit(client: redis.asyncio.Redis, *, tenant: Tenant, request_id: str,
                                    deadline: float) -> None:
    """Count the request among the tenant's queued and running ones, or a 429 at ``Tenant.max_in_flight``."""
    await in_flight_admit(client, tenant_id=tenant.pk, slug=tenant.slug, cap=tenant.max_in_flight,
                          request_id=request_id, deadline=deadline)


async def inference_in_flight_release(client: redis.asyncio.Redis, *, tenant: Tenant, request_id: str) -> None:
    """The request has ended: its place under the tenant's cap is free (a no-op when it had none)."""
    await in_flight_release(client, tenant_id=tenant.pk, request_id=request_id)


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


def prompt_context_check(params: CompletionParams, context: int, base_model: str) -> None:
    """A prompt that cannot fit the model's context is refused here, before it takes any room in Redis."""
    floor, size = prompt_token_floor(params)
    if floor >= context:
        raise InferenceError(
            f"the prompt is {size} bytes, so at least {floor} tokens, and {base_model}'s context is {context} "
            "tokens including the completion; shorten the prompt",
            code="context_length_exceeded", param=params.prompt_param,
        )


@dataclass
class Choice:
    """One of a request's n answers, as its deltas arrive (``index`` orders them, from 0)."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    logprob_content: list[dict[str, Any]] = field(default_factory=list)  # one entry per token, OpenAI's chat shape
    finish_reason: str | None = None  # the engine's: "stop" | "length" | "cancelled"

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


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
        self.cached_tokens = 0  # of the prompt tokens, those found in the engine's prefix cache
        self.completion_tokens = 0
        self.choices = [Choice(0)]  # n of them once started
        self.finish_reason: str | None = None  # choice 0's, set when the request is done
        self.first_token_after: float | None = None  # seconds from arrival to the first token
        self.reserved_tokens = 0
        self.ended = False
        self._responses: Subscription | None = None  # this request's response stream, while it is read
        self._events: deque[DeltaEvent | DoneEvent | ErrorEvent] = deque()

    @property
    def model_id(self) -> str:
        """The model served, as responses name it: ``name@N`` or the base model's name."""
        if self.resolved is not None:
            return self.resolved.model_id
        return self.params.model if self.params else ""

    @property
    def text(self) -> str:
        """Choice 0's text."""
        return self.choices[0].text

    # ---- admission -------------------------------------------------------------------------

    async def start(self, params: CompletionParams) -> None:
        self.params = params
        self.choices = [Choice(i) for i in range(params.n)]
        self.resolved = await serving_db(model_resolve, owner=self.tenant.pk)(tenant=self.tenant, model=params.model)
        base_model = self.resolved.base_model.name
        prompt_context_check(params, self.resolved.base_model.model_descriptor.max_position_embeddings, base_model)
        client = async_redis()
        try:
            if not engine_serving(await engines_live(client, base_model=base_model)):
                raise InferenceError(
                    f"no engine is serving {base_model} right now; try again shortly (operators: start one with "
                    f"python -m engine_daemon serve --model {base_model})",
                    code="engine_unavailable",
                )
            self.deadline = self.arrived + settings.LORAFLEET_REQUEST_TIMEOUT
            await inference_in_flight_admit(client, tenant=self.tenant, request_id=self.request_id,
                                            deadline=self.deadline)
            self.reserved_tokens = await inference_tokens_reserve(
                client, key=self.key, tenant=self.tenant, tokens=params.tokens_reserved(),
            )
            request = InferenceRequest(
                request_id=self.request_id,
                tenant_id=str(self.tenant.pk),
                key_id=str(self.key.pk),
                base_model=base_model,
                messages=params.messages,
                prompt=params.prompt,
                tools=params.tools,
                adapter=self.resolved.adapter_name,
                adapter_sha256=self.resolved.adapter_sha256,
                sampling=params.sampling(),
                deadline=self.deadline,
                created=self.arrived,
            )
            pipe = client.pipeline(transaction=True)
            protocol.enqueue_request(pipe, request, weight=self.tenant.fair_share_weight)
            await pipe.execute()
        except redis.RedisError as exc:
            raise redis_unavailable(exc) from None
        self.submitted = True

    # ---- the engine's answer ---------------------------------------------------------------

    async def next_event(self) -> DeltaEvent | DoneEvent:
        """The next delta, or the done event; raises InferenceError for an engine error or a passed deadline."""
        if self._responses is None:
            self._responses = response_reader().subscribe(protocol.response_stream(self.request_id))
        try:
            while not self._events:
                remaining = self.deadline + DEADLINE_GRACE_SECONDS - time.time()
                if remaining <= 0:
                    if (outage := self._responses.outage()) is not None:
                        raise redis_unavailable(outage)
                    raise InferenceError(
                        f"the request did not finish within {settings.LORAFLEET_REQUEST_TIMEOUT:g} s; the engines "
                        "are busy or down: try again later, or ask for fewer tokens", code="deadline_exceeded",
                    )
                try:
                    entries = await self._responses.entries(timeout=remaining)
                except ResponsesUnavailable as exc:
                    raise redis_unavailable(exc) from None
                for fields in entries:
                    try:
                        self._events.append(protocol.response_event_from_redis(fields))
                    except ProtocolError as exc:
                        raise InferenceError(f"the engine sent a malformed event: {exc}", code="engine_error") from None
            event = self._events.popleft()
        except BaseException:  # an error, a passed deadline, or the client gone: nothing more is read
            self._responses.close()
            raise
        if not isinstance(event, DeltaEvent):
            self._responses.close()  # done or an error: the stream has ended
        if isinstance(event, ErrorEvent):
            raise InferenceError.from_engine(event.code, event.message, prompt_param=self.params.prompt_param)
        if isinstance(event, DeltaEvent):
            if event.token_ids and self.first_token_after is None:
                self.first_token_after = time.monotonic() - self._clock
            self._choice_add(event)
            self.completion_tokens += len(event.token_ids)
        else:
            self.prompt_tokens = event.prompt_tokens
            self.cached_tokens = event.cached_tokens
            self.completion_tokens = event.completion_tokens
            self.finish_reason = event.finish_reason
            reasons = event.finish_reasons or [event.finish_reason]  # [] from engines before n
            for choice in self.choices:
                if choice.finish_reason is None:
                    choice.finish_reason = reasons[choice.index] if choice.index < len(reasons) else event.finish_reason
        return event

    def _choice_add(self, event: DeltaEvent) -> None:
        if not 0 <= event.index < len(self.choices):
            raise InferenceError(f"the engine sent choice {event.index} of a request for {len(self.choices)}",
                                 code="engine_error")
        choice = self.choices[event.index]
        choice.text_parts.append(event.text)
        choice.logprob_content.extend(event.logprob_content or ())
        if event.finish_reason is not None:
            choice.finish_reason = event.finish_reason

    async def run_to_end(self) -> DoneEvent:
        while True:
            event = await self.next_event()
            if isinstance(event, DoneEvent):
                return event

    # ---- the end ----------------------------------------------------------------------------

    async def end(self, status: str, error_code: str = "") -> None:
        """Give back the in-flight place, settle the token reservation, record usage; the first call wins. A
        request that did not end on the engine (cancelled, timed out) is cancelled there, which frees its KV
        cache at once."""
        if self.ended:
            return
        self.ended = True
        if self._responses is not None:
            self._responses.close()
        client = async_redis()
        try:  # first and on its own: a request refused after it took its place must give it back
            await inference_in_flight_release(client, tenant=self.tenant, request_id=self.request_id)
        except redis.RedisError as exc:  # the place expires at the request's deadline
            log.warning("could not release the in-flight place of request %s: %s", self.request_id, exc)
        try:
            if self.submitted and self.finish_reason is None and status in (Usage.Status.CANCELLED,
                                                                             Usage.Status.TIMEOUT):
                await client.xadd(protocol.CONTROL_STREAM,
                                  ControlEvent(action=ControlEvent.CANCEL, request_id=self.request_id).to_redis(),
                                  maxlen=CONTROL_STREAM_MAXLEN, approximate=True)
        except redis.RedisError as exc:  # the engine's deadline ends the request
            log.warning("could not cancel request %s: %s", self.request_id, exc)
        try:
            if self.reserved_tokens:
                await inference_tokens_settle(client, key=self.key, tenant=self.tenant,
                                              reserved=self.reserved_tokens, used=self.tokens_used())
        except redis.RedisError as exc:  # the bucket refills by itself
            log.warning("could not settle the tokens of request %s: %s", self.request_id, exc)
        async with usage_write_turn():
            await serving_db(self._record, owner=self.tenant.pk)(status, error_code)

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
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            time_to_first_token=self.first_token_after,
            total_time=time.monotonic() - self._clock,
            stream=bool(self.params and self.params.stream),
            created=datetime.fromtimestamp(self.arrived, tz=UTC),
        )


def status_for_error(exc: InferenceError) -> str:
    return Usage.Status.TIMEOUT if exc.code == "deadline_exceeded" else Usage.Status.ERROR
