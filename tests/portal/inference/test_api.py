"""/v1 through the real ASGI application and real Redis, against a scripted engine (FakeEngine).

The official ``openai`` client parses the answers: that it accepts them is the schema check.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta

import openai
import pytest
from django.utils import timezone

from engine_daemon import protocol
from engine_daemon.protocol import ControlEvent, DeltaEvent, DoneEvent, ErrorEvent, InferenceRequest
from portal.adapters import services as adapter_services
from portal.api_keys.services import api_key_revoke
from portal.usage.models import Usage
from tests.portal import factories
from tests.portal.inference.conftest import asgi_client, openai_client, run
from tests.portal.inference.fake_engine import FakeEngine, error, words

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "random:tiny", "messages": [{"role": "user", "content": "Ahoy"}]}


def post(path: str, body: dict, headers: dict | None = None):
    async def main():
        async with asgi_client() as client:
            return await client.post(path, json=body, headers=headers or {})

    return run(main)


def get(path: str, headers: dict | None = None):
    async def main():
        async with asgi_client() as client:
            return await client.get(path, headers=headers or {})

    return run(main)


def assert_error(response, status: int, code: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param, error
    assert error["message"]
    return error


def sse_events(raw: bytes) -> list:
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ---- the happy path, through the openai client -----------------------------------------------------


def test_chat_and_completion_through_the_openai_client(engine, secret, tenant):
    async def main():
        client = openai_client(secret)
        chat = await client.chat.completions.create(model="random:tiny", messages=CHAT["messages"], max_tokens=3,
                                                    temperature=0, seed=3, stop=["\n"], user="u-1")
        text = await client.completions.create(model="random:tiny", prompt="Ahoy", max_tokens=50)
        return chat, text

    chat, text = run(main)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == "random:tiny"
    assert chat.choices[0].message.content == "Ahoy there," and chat.choices[0].finish_reason == "length"
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (7, 3, 10)
    assert chat.usage.prompt_tokens_details.cached_tokens == 4  # the engine's prefix cache held 4 of the 7
    assert text.object == "text_completion" and text.choices[0].text == "Ahoy there, matey"
    assert (text.usage.prompt_tokens, text.usage.prompt_tokens_details.cached_tokens) == (7, 4)
    assert text.choices[0].finish_reason == "stop"

    sent = {r.request_id: r for r in engine.requests}
    chat_request, text_request = sent[chat.id], sent[text.id]
    assert chat_request.messages == CHAT["messages"] and chat_request.prompt is None
    assert chat_request.sampling == {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": 3,
                                     "stop": ["\n"], "stop_token_ids": [], "ignore_eos": False, "logprobs": False,
                                     "top_logprobs": 0, "n": 1, "guided_json": None,
                                     "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {}}
    assert chat_request.tenant_id == str(tenant.pk) and chat_request.key_id
    assert chat_request.adapter is None and chat_request.adapter_sha256 is None
    assert 299 < chat_request.deadline - chat_request.created <= 300
    assert text_request.prompt == "Ahoy" and text_request.messages is None

    records = {u.request_id: u for u in Usage.objects.all()}
    assert set(records) == {chat.id, text.id}
    record = records[chat.id]
    assert (record.status, record.prompt_tokens, record.completion_tokens, record.model) == ("ok", 7, 3, "random:tiny")
    assert record.cached_tokens == 4 and not record.engine_reported  # the portal's row, from the done event
    assert record.tenant == tenant and record.api_key_id == chat_request.key_id and record.base_model.name == "random:tiny"
    assert 0 < record.time_to_first_token <= record.total_time and not record.stream


@pytest.fixture
def ready_adapter(tenant, base_model, peft_zip, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        version = adapter_services.adapter_create(tenant=tenant, name="pirate", base_model=base_model,
                                                  upload=factories.archive_upload(peft_zip))
    version.refresh_from_db()
    assert version.status == "ready"
    return version


def test_an_adapter_by_name_and_by_version(engine, secret, ready_adapter):
    async def main():
        client = openai_client(secret)
        by_name = await client.chat.completions.create(model="pirate", messages=CHAT["messages"])
        by_version = await client.chat.completions.create(model="pirate@1", messages=CHAT["messages"])
        return by_name, by_version

    by_name, by_version = run(main)
    assert by_name.model == by_version.model == "pirate@1"
    for request in engine.requests:
        assert (request.adapter, request.adapter_sha256) == ("pirate@1", ready_adapter.sha256)
    record = Usage.objects.get(request_id=by_name.id)
    assert (record.adapter_version, record.adapter, record.model) == (ready_adapter, "pirate@1", "pirate")


def test_streaming_is_framed_exactly_as_openai_does(engine, auth):
    def script(request):
        return [DeltaEvent("Ah", [1]), DeltaEvent("", [2]), DeltaEvent("oy", [3]),
                DoneEvent("length", 5, 3, 0.01, cached_tokens=2)]

    engine.script = script
    response = post("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, auth)
    assert response.status_code == 200 and response.headers["content-type"] == "text/event-stream"
    assert response.headers["cache-control"] == "no-cache"
    events = sse_events(response.content)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert [c["choices"][0]["delta"] if c["choices"] else None for c in chunks] == [
        {"role": "assistant", "content": ""}, {"content": "Ah"}, {"content": "oy"}, {}, None,
    ]  # the delta that only held back text (a partial character, a stop-string prefix) sends nothing
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None, None, None, "length"]
    assert [c["usage"] for c in chunks[:-1]] == [None] * 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}
    record = Usage.objects.get()
    assert (record.status, record.stream, record.prompt_tokens, record.completion_tokens) == ("ok", True, 5, 3)
    assert record.cached_tokens == 2


def test_completion_streams_through_the_openai_client(engine, secret):
    async def main():
        client = openai_client(secret)
        stream = await client.completions.create(model="random:tiny", prompt="Ahoy", stream=True, max_tokens=2)
        return [chunk async for chunk in stream]

    chunks = run(main)
    assert [c.choices[0].text for c in chunks] == ["Ahoy", " there", ""]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "length"]
    assert all(c.object == "text_completion" for c in chunks)


def test_the_last_chunk_of_a_stream_tells_the_openai_client_the_cached_tokens(engine, secret):
    async def main():
        client = openai_client(secret)
        stream = await client.chat.completions.create(model="random:tiny", messages=CHAT["messages"], stream=True,
                                                      stream_options={"include_usage": True})
        return [chunk async for chunk in stream]

    chunks = run(main)
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.total_tokens, usage.prompt_tokens_details.cached_tokens) == (7, 11, 4)


def test_streaming_without_include_usage_has_no_usage_chunk(engine, auth):
    events = sse_events(post("/v1/chat/completions", {**CHAT, "stream": True}, auth).content)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


# ---- errors --------------------------------------------------------------------------------------


def test_401_for_a_missing_malformed_unknown_revoked_or_expired_key(engine, tenant):
    revoked, revoked_secret = factories.api_key_for(tenant, name="revoked")
    api_key_revoke(key=revoked)
    expired, expired_secret = factories.api_key_for(tenant, name="expired")
    expired.expiry_date = timezone.now() - timedelta(seconds=1)
    expired.save()
    _key, good = factories.api_key_for(tenant)
    for header in (None, "Basic abc", "Bearer lf_nodot", f"Bearer {good[:-3]}xyz", f"Bearer {revoked_secret}",
                   f"Bearer {expired_secret}"):
        response = post("/v1/chat/completions", CHAT, {"Authorization": header} if header else {})
        error = assert_error(response, 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
    assert Usage.objects.count() == 0

    async def main():
        with pytest.raises(openai.AuthenticationError):
            await openai_client(revoked_secret).chat.completions.create(model="random:tiny", messages=CHAT["messages"])

    run(main)


def test_403_for_a_key_without_the_inference_scope(engine, tenant):
    _key, manage_only = factories.api_key_for(tenant, scopes=("manage",))
    response = post("/v1/chat/completions", CHAT, {"Authorization": f"Bearer {manage_only}"})
    assert "inference" in assert_error(response, 403, "permission_denied")["message"]


def test_404_for_an_unknown_model_and_for_another_tenants_adapter(engine, secret, auth, base_model, peft_zip,
                                                                django_capture_on_commit_callbacks):
    other = factories.tenant_with_member("other-co", username="olga")[0]
    with django_capture_on_commit_callbacks(execute=True):
        adapter_services.adapter_create(tenant=other, name="secret-sauce", base_model=base_model,
                                        upload=factories.archive_upload(peft_zip))
    for model in ("nope", "secret-sauce", "secret-sauce@1", "random:tiny@1"):
        response = post("/v1/chat/completions", {**CHAT, "model": model}, auth)
        assert model in assert_error(response, 404, "model_not_found", "model")["message"]
    assert engine.requests == []
    assert sorted(Usage.objects.values_list("model", "status", "error_code")) == sorted(
        (m, "error", "model_not_found") for m in ("nope", "secret-sauce", "secret-sauce@1", "random:tiny@1"))
    models = get("/v1/models", auth).json()
    assert "secret-sauce" not in {m["id"] for m in models["data"]}

    async def main():
        with pytest.raises(openai.NotFoundError):
            await openai_client(secret).chat.completions.create(model="secret-sauce", messages=CHAT["messages"])

    run(main)


def test_409_for_an_adapter_without_a_ready_version(engine, auth, tenant, base_model, peft_zip, monkeypatch):
    monkeypatch.setattr(adapter_services, "_enqueue_validation", lambda version_id: None)  # stays pending
    adapter_services.adapter_create(tenant=tenant, name="later", base_model=base_model,
                                    upload=factories.archive_upload(peft_zip))
    assert_error(post("/v1/chat/completions", {**CHAT, "model": "later"}, auth), 409, "model_not_ready", "model")


def test_400_for_bad_parameters_names_them(engine, auth):
    assert_error(post("/v1/chat/completions", {**CHAT, "n": 17}, auth), 400, "invalid_value", "n")
    assert_error(post("/v1/chat/completions", {**CHAT, "tools": []}, auth), 400, "invalid_value", "tools")
    assert_error(post("/v1/completions", {"model": "random:tiny"}, auth), 400, "missing_required_parameter", "prompt")

    async def main():
        async with asgi_client() as client:
            return await client.post("/v1/chat/completions", content=b"{nope", headers=auth)

    assert_error(run(main), 400, "invalid_json")
    assert engine.requests == []
    assert Usage.objects.filter(status="error").count() == 4


def test_400_when_the_engine_finds_the_prompt_too_long(engine, auth, secret):
    engine.script = error("context_length_exceeded", "the prompt has 600 tokens; this model's context is 512")
    assert "600 tokens" in assert_error(post("/v1/chat/completions", CHAT, auth), 400, "context_length_exceeded",
                                        "messages")["message"]
    # streaming too: the portal waits for the first event before it answers, so the status is still right
    assert_error(post("/v1/completions", {"model": "random:tiny", "prompt": "x", "stream": True}, auth), 400,
                 "context_length_exceeded", "prompt")
    assert set(Usage.objects.values_list("status", "error_code")) == {("error", "context_length_exceeded")}

    async def main():
        with pytest.raises(openai.BadRequestError) as caught:
            await openai_client(secret).chat.completions.create(model="random:tiny", messages=CHAT["messages"])
        assert caught.value.code == "context_length_exceeded"

    run(main)


def test_429_with_retry_after_past_the_requests_per_minute(engine, auth, tenant, secret):
    tenant.requests_per_minute = 2
    tenant.save()
    assert post("/v1/chat/completions", CHAT, auth).status_code == 200
    assert post("/v1/chat/completions", CHAT, auth).status_code == 200
    response = post("/v1/chat/completions", CHAT, auth)
    error = assert_error(response, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error" and 1 <= int(response.headers["Retry-After"]) <= 30
    assert Usage.objects.count() == 2  # refusals by the limiter are not recorded

    async def main():
        with pytest.raises(openai.RateLimitError):
            await openai_client(secret).chat.completions.create(model="random:tiny", messages=CHAT["messages"])

    run(main)


def test_429_past_the_tokens_per_minute_and_the_reservation_is_settled(engine, auth, tenant):
    tenant.tokens_per_minute = 600
    tenant.save()
    body = {**CHAT, "max_tokens": 400}
    assert post("/v1/chat/completions", body, auth).status_code == 200  # reserves ~404, uses 7 + 4: refunded
    assert post("/v1/chat/completions", body, auth).status_code == 200
    engine.script = lambda request: [0.5, *words(request)]

    async def main():  # two at once: the second cannot reserve while the first holds its reservation
        async with asgi_client() as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body, headers=auth)
                                          for _ in range(2)))

    statuses = sorted(r.status_code for r in run(main))
    assert statuses == [200, 429]
    too_big = post("/v1/chat/completions", {**CHAT, "max_tokens": 700}, auth)
    assert "600 tokens per minute" in assert_error(too_big, 400, "invalid_value", "max_tokens")["message"]


def test_503_when_no_engine_serves_the_base_model(redis_client, auth, base_model, secret):
    assert "no engine is serving random:tiny" in assert_error(post("/v1/chat/completions", CHAT, auth), 503,
                                                              "engine_unavailable")["message"]
    stale = FakeEngine(redis_client, engine_id="stale")
    stale.beat()
    redis_client.hset(protocol.heartbeat_key("stale"), "updated", json.dumps(time.time() - 60))
    assert_error(post("/v1/chat/completions", CHAT, auth), 503, "engine_unavailable")
    FakeEngine(redis_client, engine_id="draining", draining=True).beat()
    assert_error(post("/v1/chat/completions", CHAT, auth), 503, "engine_unavailable")
    FakeEngine(redis_client, base_model="random:smollm2-135m", engine_id="elsewhere").beat()
    assert_error(post("/v1/chat/completions", CHAT, auth), 503, "engine_unavailable")
    assert list(redis_client.scan_iter("lf:req:random:tiny:*")) == []  # nothing was queued
    assert set(Usage.objects.values_list("status", "error_code")) == {("error", "engine_unavailable")}

    async def main():
        with pytest.raises(openai.InternalServerError) as caught:
            await openai_client(secret).chat.completions.create(model="random:tiny", messages=CHAT["messages"])
        assert caught.value.status_code == 503

    run(main)


def test_503_when_the_engine_cannot_load_the_adapter(engine, auth):
    engine.script = error("adapter_unavailable", "adapter 0000 is not in the cache")
    assert_error(post("/v1/chat/completions", CHAT, auth), 503, "adapter_unavailable")


def test_504_when_the_engine_reports_the_deadline_passed(engine, auth):
    engine.script = error("deadline_exceeded", "the request's deadline passed")
    assert_error(post("/v1/chat/completions", CHAT, auth), 504, "deadline_exceeded")
    assert Usage.objects.get().status == "timeout"


def test_504_when_the_portal_waits_past_the_deadline_and_the_engine_is_told_to_cancel(
        engine, auth, settings, monkeypatch, redis_client):
    from portal.inference import services

    settings.LORAFLEET_REQUEST_TIMEOUT = 0.3
    monkeypatch.setattr(services, "DEADLINE_GRACE_SECONDS", 0.2)
    engine.script = lambda request: []  # never answers
    started = time.monotonic()
    assert "within 0.3 s" in assert_error(post("/v1/chat/completions", CHAT, auth), 504,
                                          "deadline_exceeded")["message"]
    assert time.monotonic() - started < 3
    record = Usage.objects.get()
    assert record.status == "timeout" and record.error_code == "deadline_exceeded"
    cancels = [ControlEvent.from_redis(f) for _, f in redis_client.xrange(protocol.CONTROL_STREAM)]
    assert [(c.action, c.request_id) for c in cancels] == [("cancel", record.request_id)]


def test_other_engine_errors_are_500s_and_an_error_mid_stream_is_an_error_event(engine, auth, secret):
    engine.script = error("too_many_deliveries", "delivered 4 times")
    assert_error(post("/v1/chat/completions", CHAT, auth), 500, "too_many_deliveries")
    engine.script = error("something_new", "?")
    assert_error(post("/v1/chat/completions", CHAT, auth), 500, "engine_error")

    engine.script = lambda request: [DeltaEvent("Ah", [1]), ErrorEvent("deadline_exceeded", "too slow")]
    response = post("/v1/chat/completions", {**CHAT, "stream": True}, auth)
    assert response.status_code == 200
    events = sse_events(response.content)
    assert events[-1]["error"]["code"] == "deadline_exceeded" and "[DONE]" not in events

    async def main():
        stream = await openai_client(secret).chat.completions.create(model="random:tiny", messages=CHAT["messages"],
                                                                     stream=True)
        with pytest.raises(openai.APIError, match="too slow"):
            async for _chunk in stream:
                pass

    run(main)
    assert Usage.objects.filter(stream=True, status="timeout", completion_tokens=1).count() == 2


def test_unknown_methods_get_405_in_openai_shape(auth):
    response = get("/v1/chat/completions", auth)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST, OPTIONS"


# ---- a client that goes away ---------------------------------------------------------------------


async def _disconnecting_call(path: str, body: dict, headers: dict, *, after_chunks: int | None = None,
                              after_seconds: float | None = None, slow_send: bool = False) -> list[bytes]:
    """Drive the ASGI application as a server would, and hang up: after some body chunks, or some seconds."""
    from portal.asgi import application

    gone = asyncio.Event()
    chunks: list[bytes] = []
    requested = False

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if after_chunks is not None and len(chunks) >= after_chunks:
                gone.set()
                if slow_send:  # the server is still writing when it learns the client has gone
                    await asyncio.sleep(1)

    if after_seconds is not None:
        asyncio.get_running_loop().call_later(after_seconds, gone.set)
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                    *((k.lower().encode(), v.encode()) for k, v in headers.items())],
        "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
    }
    await asyncio.wait_for(application(scope, receive, send), 30)
    return chunks


def _slow_words(request: InferenceRequest) -> list:
    events: list = []
    for i in range(100):
        events += [DeltaEvent(f" w{i}", [i]), 0.02]
    return events + [DoneEvent("length", 3, 100)]


def _wait_for(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _cancelled(redis_client) -> list[str]:
    return [ControlEvent.from_redis(f).request_id for _, f in redis_client.xrange(protocol.CONTROL_STREAM)]


@pytest.mark.parametrize("slow_send", [False, True], ids=["waiting-for-tokens", "while-sending"])
def test_a_client_that_disconnects_mid_stream_cancels_its_request(engine, auth, redis_client, slow_send):
    engine.script = _slow_words
    chunks = run(lambda: _disconnecting_call("/v1/chat/completions", {**CHAT, "stream": True}, auth,
                                             after_chunks=4, slow_send=slow_send))
    assert 4 <= len(chunks) < 20
    request_id = json.loads(chunks[0].decode().removeprefix("data: "))["id"]
    _wait_for(lambda: Usage.objects.filter(request_id=request_id).exists())
    _wait_for(lambda: request_id in engine.cancels)
    assert _cancelled(redis_client) == [request_id]
    record = Usage.objects.get(request_id=request_id)
    assert record.status == "cancelled" and 3 <= record.completion_tokens < 100 and record.stream


def test_a_client_that_disconnects_while_waiting_for_a_whole_answer_cancels_it(engine, auth, redis_client):
    engine.script = _slow_words
    chunks = run(lambda: _disconnecting_call("/v1/completions", {"model": "random:tiny", "prompt": "x"}, auth,
                                             after_seconds=0.3))
    assert chunks == []
    _wait_for(lambda: Usage.objects.exists())
    record = Usage.objects.get()
    assert record.status == "cancelled" and 0 < record.completion_tokens < 100
    assert _cancelled(redis_client) == [record.request_id]


# ---- models and health ---------------------------------------------------------------------------


def test_models_lists_base_models_and_the_tenants_ready_adapters(engine, auth, secret, tenant, ready_adapter):
    from portal.adapters.selectors import model_ids_for_tenant

    body = get("/v1/models", auth).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == model_ids_for_tenant(tenant=tenant) == ["random:tiny", "pirate",
                                                                                       "pirate@1"]
    assert [m["owned_by"] for m in body["data"]] == ["lorafleet", "acme", "acme"]

    async def main():
        client = openai_client(secret)
        listed = [m.id async for m in client.models.list()]
        one = await client.models.retrieve("pirate@1")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")
        return listed, one

    listed, one = run(main)
    assert listed == ["random:tiny", "pirate", "pirate@1"] and one.owned_by == "acme" and one.created > 0


def test_a_base_model_a_daemon_registered_is_known_without_an_operator(redis_client, auth, db):
    from portal.base_models.models import BaseModel

    assert not BaseModel.objects.exists()
    assert_error(post("/v1/chat/completions", CHAT, auth), 404, "model_not_found", "model")  # no daemon: unknown
    with FakeEngine(redis_client):  # registers random:tiny in lf:base-models, as every daemon does at start
        response = post("/v1/chat/completions", CHAT, auth)
        assert response.status_code == 200, response.text
    assert BaseModel.objects.get().name == "random:tiny"
    with FakeEngine(redis_client, base_model="random:smollm2-135m", engine_id="second") as second:
        assert [m["id"] for m in get("/v1/models", auth).json()["data"]] == ["random:smollm2-135m", "random:tiny"]
        assert second.requests == []


def test_healthz_reports_database_redis_and_live_engines(engine, settings, db):
    body = get("/healthz").json()
    assert body["status"] == "ok" and body["database"] == {"ok": True} and body["redis"] == {"ok": True}
    [live] = body["engines"]
    assert (live["id"], live["base_model"], live["draining"]) == ("fake-engine", "random:tiny", False)
    assert 0 <= live["heartbeat_age_seconds"] < protocol.HEARTBEAT_TTL_SECONDS

    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    response = get("/healthz")
    assert response.status_code == 503
    assert response.json()["redis"]["ok"] is False and response.json()["engines"] == []


def test_healthz_is_503_without_a_database(engine, monkeypatch):
    from portal.inference import views

    monkeypatch.setattr(views, "_database_check", lambda: {"ok": False, "error": "connection refused"})
    response = get("/healthz")
    assert response.status_code == 503 and response.json()["database"]["ok"] is False


def test_a_redis_outage_is_a_503_not_a_crash(engine, auth, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    assert_error(post("/v1/chat/completions", CHAT, auth), 503, "engine_unavailable")


def test_a_prompt_that_cannot_fit_the_context_is_refused_before_it_is_queued(engine, auth, redis_client, base_model):
    context = base_model.model_descriptor.max_position_embeddings
    from portal.inference.params import MAX_BYTES_PER_TOKEN

    huge = "a" * (context * MAX_BYTES_PER_TOKEN)  # at least `context` tokens whatever the tokenizer
    body = {**CHAT, "messages": [{"role": "user", "content": huge}]}
    error = assert_error(post("/v1/chat/completions", body, auth), 400, "context_length_exceeded", "messages")
    assert f"context is {context} tokens" in error["message"] and "shorten the prompt" in error["message"]
    assert list(redis_client.scan_iter("lf:req:*")) == [] and engine.requests == []
    fits = {**CHAT, "messages": [{"role": "user", "content": "a" * (context * MAX_BYTES_PER_TOKEN // 2)}]}
    assert post("/v1/chat/completions", fits, auth).status_code == 200  # the engine's own tokenizer decides those
