"""The OpenAI-compatible API (/v1) and /healthz: async views that parse, call the services, render.

Errors of every kind leave through ``errors.error_response``; see ``services`` for the life of
one request and ``ratelimits`` for the limits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis
from asgiref.sync import async_to_sync, sync_to_async
from django.core.exceptions import RequestDataTooBig
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views import View

from engine_daemon.protocol import DeltaEvent, DoneEvent, Heartbeat
from portal.api_keys.models import TenantAPIKey
from portal.common.redis import redis_client
from portal.inference import render
from portal.inference.engines import base_models_sync, engines_live
from portal.inference.errors import InferenceError, error_response
from portal.inference.params import CHAT, COMPLETION, body_parse, completion_params_parse
from portal.inference.selectors import ModelEntry, model_list_for_tenant
from portal.inference.services import Completion, async_redis, inference_admit, serving_db, status_for_error
from portal.tenants.models import Tenant
from portal.usage.models import Usage

log = logging.getLogger(__name__)
HEALTH_CHECK_SECONDS = 3.0


class OpenAIView(View):
    """Answers unknown methods in OpenAI's error shape too."""

    async def http_method_not_allowed(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        allowed = ", ".join(m.upper() for m in self._allowed_methods())
        response = error_response(InferenceError(f"{request.method} is not allowed here; use {allowed}",
                                                 code="method_not_allowed"))
        response["Allow"] = allowed
        return response


async def _authenticated(request: HttpRequest) -> tuple[TenantAPIKey, Tenant]:
    return await inference_admit(authorization=request.headers.get("Authorization"))


class ModelsApi(OpenAIView):
    async def get(self, request: HttpRequest) -> HttpResponse:
        try:
            _key, tenant = await _authenticated(request)
        except InferenceError as exc:
            return error_response(exc)
        return JsonResponse(render.model_list_body(await serving_db(_models_synced, owner=tenant.pk)(tenant)))


class ModelDetailApi(OpenAIView):
    async def get(self, request: HttpRequest, model: str) -> HttpResponse:
        try:
            _key, tenant = await _authenticated(request)
            for entry in await serving_db(_models_synced, owner=tenant.pk)(tenant):
                if entry.id == model:
                    return JsonResponse(render.model_body(entry))
            raise InferenceError(f"the model {model!r} does not exist; GET /v1/models lists yours",
                                 code="model_not_found", param="model")
        except InferenceError as exc:
            return error_response(exc)


async def endpoint_not_found(request: HttpRequest, path: str) -> HttpResponse:
    """Any other URL under /v1/: a 404 in OpenAI's shape too, as OpenAI answers one."""
    return error_response(InferenceError(
        f"{request.method} {request.path} is not an endpoint of this API; it serves GET /v1/models, "
        "GET /v1/models/{model}, POST /v1/chat/completions and POST /v1/completions", code="not_found"))


def _models_synced(tenant: Tenant) -> list[ModelEntry]:
    try:
        base_models_sync(redis_client())
    except redis.RedisError as exc:  # the registered models are still listed
        log.warning("could not read the engines' base models: %s", exc)
    return model_list_for_tenant(tenant=tenant)


class _CompletionsApi(OpenAIView):
    kind: str

    async def post(self, request: HttpRequest) -> HttpResponse:
        try:
            key, tenant = await _authenticated(request)
        except InferenceError as exc:
            return error_response(exc)  # not recorded: no tenant yet, or one over its request rate
        completion = Completion(key=key, tenant=tenant, kind=self.kind)
        try:
            params = completion_params_parse(body_parse(_body(request)), kind=self.kind)
            await completion.start(params)
            if params.stream:
                # Waiting for the first event lets an error before the first token keep its status (400, 504...).
                first = await completion.next_event()
                return EventStreamResponse(completion, first)
            await completion.run_to_end()
        except InferenceError as exc:
            await completion.end(status_for_error(exc), exc.code)
            return error_response(exc)
        except asyncio.CancelledError:  # the client went away
            await completion.end(Usage.Status.CANCELLED)
            raise
        except BaseException:
            await completion.end(Usage.Status.ERROR, "internal_error")
            raise
        await completion.end(Usage.Status.OK)
        return JsonResponse(render.completion_body(completion))


class ChatCompletionsApi(_CompletionsApi):
    kind = CHAT


class CompletionsApi(_CompletionsApi):
    kind = COMPLETION


def _body(request: HttpRequest) -> bytes:
    try:
        return request.body
    except RequestDataTooBig:
        raise InferenceError("the request body is too large; shorten the prompt", code="request_too_large") from None


class EventStreamResponse(StreamingHttpResponse):
    """A completion as OpenAI's server-sent events.

    A client that disconnects cancels the task sending this response. When that lands while the
    relay awaits the engine, the relay ends the request itself. When it lands while the server
    writes a chunk, the relay is left suspended; Django still closes the response, and closing
    ends the request (a no-op for one that has ended).
    """

    def __init__(self, completion: Completion, first: DeltaEvent | DoneEvent) -> None:
        super().__init__(_relay(completion, first), content_type="text/event-stream")
        self.completion = completion
        self["Cache-Control"] = "no-cache"
        self["X-Accel-Buffering"] = "no"  # proxies must not hold tokens back

    def close(self) -> None:
        try:
            if not self.completion.ended:
                async_to_sync(self.completion.end)(Usage.Status.CANCELLED)
        finally:
            super().close()


async def _relay(completion: Completion, event: DeltaEvent | DoneEvent) -> AsyncIterator[bytes]:
    """A role chunk per choice (chat), content chunks, a chunk with each choice's finish reason as it ends
    (those the engine did not end by a delta, at the done event), the usage chunk when asked for,
    ``[DONE]``. An error after the first event is sent as an error event."""
    try:
        if completion.kind == CHAT:
            for choice in completion.choices:
                yield render.sse_event(render.chunk_body(completion, index=choice.index, role="assistant", text=""))
        ended: set[int] = set()
        text_offsets = [0] * len(completion.choices)  # /v1/completions' logprobs count characters per choice
        while isinstance(event, DeltaEvent):
            for chunk in render.delta_chunks(completion, event, text_offset=text_offsets[event.index]):
                yield render.sse_event(chunk)
            text_offsets[event.index] += sum(len(entry["token"]) for entry in event.logprob_content or ())
            if event.finish_reason is not None:
                ended.add(event.index)
            event = await completion.next_event()
        for choice in completion.choices:
            if choice.index not in ended:
                for chunk in render.choice_end_chunks(completion, choice):
                    yield render.sse_event(chunk)
        if completion.params.include_usage:
            yield render.sse_event(render.usage_chunk_body(completion))
        await completion.end(Usage.Status.OK)
        yield render.SSE_DONE
    except InferenceError as exc:
        await completion.end(status_for_error(exc), exc.code)
        yield render.sse_event(exc.body())
    except (asyncio.CancelledError, GeneratorExit):
        await completion.end(Usage.Status.CANCELLED)
        raise
    except BaseException:
        await completion.end(Usage.Status.ERROR, "internal_error")
        raise


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and Redis answer (engines are listed, not required), else 503."""
    database = await sync_to_async(_database_check)()
    client = async_redis()
    try:
        await asyncio.wait_for(client.ping(), HEALTH_CHECK_SECONDS)
        engines = await engines_live(client)
        cache = {"ok": True}
    except (redis.RedisError, TimeoutError) as exc:
        engines = []
        cache = {"ok": False, "error": str(exc) or type(exc).__name__}
    if database["ok"] and cache["ok"]:
        await sync_to_async(_models_synced_quietly)()
    body = {
        "status": "ok" if database["ok"] and cache["ok"] else "unavailable",
        "database": database,
        "redis": cache,
        "engines": [_engine_body(beat) for beat in engines],
    }
    return JsonResponse(body, status=200 if body["status"] == "ok" else 503)


def _database_check() -> dict[str, Any]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"ok": True}
    except Exception as exc:  # any driver's error means the same: no database
        return {"ok": False, "error": str(exc) or type(exc).__name__}


def _models_synced_quietly() -> None:
    try:
        base_models_sync(redis_client())
    except Exception as exc:  # health is reported above; a failed sync must not fail the check
        log.warning("could not sync the engines' base models: %s", exc)


def _engine_body(beat: Heartbeat) -> dict[str, Any]:
    return {
        "id": beat.engine_id,
        "base_model": beat.base_model,
        "device": beat.device,
        "heartbeat_age_seconds": round(max(0.0, time.time() - beat.updated), 3),
        "running": beat.running,
        "waiting": beat.waiting,
        "draining": beat.draining,
    }
