"""A property-based fuzz of the two HTTP APIs: whatever a client sends, the answer is never a 5xx.

- ``/api/v1/`` from its OpenAPI schema (schemathesis, in-process over WSGI), as a tenant's manage key and,
  for the session-only key endpoints, as its signed-in owner. Responses must also match the schema where it
  documents them (content type, headers, body of the documented statuses; errors are not documented).
- ``/v1/`` (no schema) from Hypothesis strategies: valid and hostile JSON bodies, bad headers, broken bytes,
  through the real ASGI application against the fake engine. The engine is up, so valid requests complete and
  the one documented 5xx (503 ``engine_unavailable``) cannot happen. Every /v1 error is OpenAI-shaped.

Bounded: ``API_EXAMPLES`` per /api/v1 operation (``UPLOAD_EXAMPLES`` for the uploads, each validated in a
sandboxed child process; schemathesis adds its own examples and a few calls per unexpected method), and
``V1_EXAMPLES`` bodies per completion endpoint, half that of headers and bytes, a third of methods and paths.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
import schemathesis
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
)

from portal.adapters import services as adapter_services
from portal.adapters.uploads import AdapterUpload
from tests.portal import factories
from tests.portal.inference.conftest import asgi_client, run
from tests.portal.inference.fake_engine import FakeEngine

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

API_EXAMPLES = 25
UPLOAD_EXAMPLES = 5
V1_EXAMPLES = 150
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))
CSRF_TOKEN = "fuzzcsrftokenfuzzcsrftokenfuzzcs"  # a 32-character secret: the cookie and the header agree
UPLOADS = r"^/api/v1/adapters(/\{name\}/versions)?$"


# ---- /api/v1 from the schema -----------------------------------------------------------------------


def api_schema() -> schemathesis.schemas.BaseSchema:
    """The schema /api/schema/ serves, generated in-process: schemathesis builds its tests at collection."""
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    from portal.wsgi import application

    spec = json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))
    loaded = schemathesis.openapi.from_dict(spec)
    loaded.app = application
    return loaded


schema = api_schema()
API_CHECKS = [not_a_server_error, content_type_conformance, response_headers_conformance,
              response_schema_conformance]
SEEDED: dict[str, str] = {}  # what the ``seeded`` fixture made for the running test


@schema.hook
def before_generate_path_parameters(context, strategy):
    """Generated names miss (404); a share of the cases name what ``seeded`` made, so the operations on an
    existing adapter, version and key run too."""
    known = {"name": st.builds(lambda: SEEDED["adapter"]), "number": st.sampled_from([1, 2]),
             "prefix": st.builds(lambda: SEEDED["prefix"])}
    names = re.findall(r"\{(\w+)\}", context.operation.path)
    return strategy | st.fixed_dictionaries({name: known[name] for name in names})


@pytest.fixture
def seeded(tenant_a, base_model, monkeypatch):
    """Tenant A's manage key and owner's session, an adapter with a pending version, a key to revoke."""
    tenant, owner = tenant_a
    with monkeypatch.context() as patch:  # the seeded version stays pending; the fuzzed uploads are validated
        patch.setattr(adapter_services, "_enqueue_validation", lambda version_id: None)
        adapter_services.adapter_create(tenant=tenant, name="seeded", base_model=base_model, upload=AdapterUpload(
            archive=SimpleUploadedFile("adapter.zip", b"PK\x05\x06" + bytes(18))))
    SEEDED.update(adapter="seeded", prefix=factories.api_key_for(tenant, name="to revoke")[0].prefix)
    _key, secret = factories.api_key_for(tenant, scopes=("manage",))
    client = Client()
    client.force_login(owner)
    yield {"headers": {"Authorization": f"Bearer {secret}", "X-CSRFToken": CSRF_TOKEN},
           "cookies": {"sessionid": client.cookies["sessionid"].value, "csrftoken": CSRF_TOKEN}}
    SEEDED.clear()


@schema.exclude(path_regex=UPLOADS, method="POST").parametrize()
@settings(FUZZ, max_examples=API_EXAMPLES)
def test_api_v1_answers_no_5xx(case, seeded):
    case.call_and_validate(**seeded, checks=API_CHECKS)


@schema.include(path_regex=UPLOADS, method="POST").parametrize()
@settings(FUZZ, max_examples=UPLOAD_EXAMPLES)
def test_api_v1_uploads_answer_no_5xx(case, seeded):
    case.call_and_validate(**seeded, checks=API_CHECKS)


# ---- /v1 from strategies ---------------------------------------------------------------------------

MODELS = ["random:tiny", "random:tiny@1", "nope", "", "@", "a@1", "a@¹", "a@99999999999999999999999", "x" * 300]
ROLES = ["system", "developer", "user", "assistant", "tool", "function", "", "USER"]
UNSUPPORTED = ["echo", "functions", "best_of", "suffix"]
TOOL_NAMES = ["get_weather", "now"]

text = st.text(max_size=40)
# Any character (NUL, controls, bidi, astral); text that is not text adds lone surrogates, which JSON can escape.
any_text = st.text(st.characters(), max_size=40)
not_text = st.text(st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff"]), min_size=1,
                   max_size=20)
huge_ints = st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64, 10**30])
numbers = huge_ints | st.floats(allow_nan=True, allow_infinity=True)  # NaN and Infinity: Python's json reads them
junk = st.recursive(st.none() | st.booleans() | numbers | any_text | not_text,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                    max_leaves=12)

# Bodies that should complete, from which each hostile body below differs in a field or two.
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES[:4]), "content": any_text}, optional={"name": text})
sampling = {
    "max_tokens": st.integers(1, 10**6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**63 - 1), "stop": text.filter(bool) | st.lists(text.filter(bool), max_size=4),
    "user": text, "n": st.integers(1, 3), "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100), max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]),
}
tool = st.builds(lambda name: {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}},
                 st.sampled_from(TOOL_NAMES))
valid_chat = st.fixed_dictionaries(
    {"model": st.just("random:tiny"), "messages": st.lists(message, min_size=1, max_size=3), "stream": st.booleans()},
    optional={**sampling, "max_completion_tokens": st.integers(1, 8), "logprobs": st.booleans(),
              "tools": st.lists(tool, min_size=1, max_size=2, unique_by=lambda t: t["function"]["name"])},
)
valid_completion = st.fixed_dictionaries({"model": st.just("random:tiny"), "prompt": any_text, "stream": st.booleans()},
                                         optional={**sampling, "logprobs": st.integers(0, 5)})

hostile_values = {
    "model": st.sampled_from(MODELS) | junk,
    "max_tokens": huge_ints | junk, "max_completion_tokens": huge_ints | junk,
    "temperature": numbers | junk, "top_p": numbers | junk, "seed": numbers | junk,
    "stop": st.lists(text | not_text | junk, max_size=6) | junk,
    "stream": junk, "n": st.sampled_from([2, 16, 17, 0, -1, 1.0, True]) | junk, "user": junk,
    "logprobs": st.booleans() | st.integers(-1, 6) | junk, "top_logprobs": st.integers(-1, 21) | junk,
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"]) | junk},
        optional={"json_schema": st.fixed_dictionaries({"name": text | junk, "schema": junk}, optional={"strict": junk})
                  | junk}) | junk,
    "tools": st.lists(st.fixed_dictionaries({"type": st.just("function") | junk, "function": st.fixed_dictionaries(
        {"name": st.sampled_from(TOOL_NAMES) | junk}, optional={"parameters": junk, "description": junk}) | junk})
        | junk, max_size=3) | junk,
    "tool_choice": st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
        {"type": st.just("function") | junk, "function": st.fixed_dictionaries({"name": st.sampled_from(TOOL_NAMES) | junk})})
        | junk,
    "parallel_tool_calls": junk,
    "presence_penalty": numbers | junk, "frequency_penalty": numbers | junk,
    "logit_bias": st.dictionaries(text | st.integers().map(str), numbers | junk, max_size=4) | junk,
    "stream_options": st.dictionaries(st.sampled_from(["include_usage", "other"]) | text, junk, max_size=2) | junk,
    "messages": st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(ROLES) | junk,
             "content": any_text | not_text | junk | st.lists(
                 st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | junk, "text": text | junk}),
                 max_size=3)},
            optional={"tool_calls": junk, "tool_call_id": junk, "function_call": junk, "audio": junk},
        ) | junk,
        max_size=4,
    ) | junk,
    "prompt": not_text | st.lists(text, max_size=3) | st.lists(st.integers(), max_size=3) | junk,
}
REQUIRED = ("model", "messages", "prompt")


def hostile(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A valid body with a field or two set to hostile values (a required one perhaps removed), or with a
    parameter this server does not implement, or an unknown one."""
    change = st.sampled_from(sorted(hostile_values)).flatmap(
        lambda name: st.tuples(st.just(name), hostile_values[name], st.booleans() if name in REQUIRED else st.just(False)))
    unknown = st.tuples(st.sampled_from(UNSUPPORTED) | text, junk, st.just(False))

    def spoil(body: dict, changes: list[tuple[str, Any, bool]]) -> dict:
        body = dict(body)
        for name, value, remove in changes:
            if remove:
                body.pop(name, None)
            else:
                body[name] = value
        return body

    return st.builds(spoil, valid, st.lists(change, min_size=1, max_size=2, unique_by=lambda c: c[0])
                     | st.lists(unknown, min_size=1, max_size=1))


def with_field(valid: st.SearchStrategy, name: str) -> st.SearchStrategy:
    """A valid body but for ``name``: the messages and the prompt, whose shapes vary most, get a branch each."""
    return st.builds(lambda body, value: {**body, name: value}, valid, hostile_values[name])


chat_bodies = valid_chat | hostile(valid_chat) | with_field(valid_chat, "messages") | junk
completion_bodies = valid_completion | hostile(valid_completion) | with_field(valid_completion, "prompt") | junk


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def send(method: str, path: str, content: bytes = b"", headers: dict[str, Any] | None = None):
    # Noted because schemathesis, once imported, blanks the values in Hypothesis's report of a failing case.
    note(f"{method} {path} headers={headers!r} body={content[:500]!r}{'...' if len(content) > 500 else ''}")

    async def main():
        async with asgi_client(timeout=30) as client:
            return await client.request(method, path, content=content, headers=headers or {})

    return run(main)


def assert_openai_error(error: Any) -> None:
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and isinstance(error["code"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error


def check(response, seen: Counter) -> None:
    """No 5xx; an error is OpenAI-shaped; a stream is data events that end in [DONE] or an error event."""
    seen[response.status_code] += 1
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_openai_error(response.json()["error"])
    elif response.headers["content-type"] == "text/event-stream":
        blocks = response.text.split("\n\n")
        assert blocks[-1] == "" and all(block.startswith("data: ") for block in blocks[:-1]), response.text
        events = [block.removeprefix("data: ") for block in blocks[:-1]]
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks and all("object" in chunk for chunk in chunks), response.text
        if events[-1] != "[DONE]":
            assert_openai_error(json.loads(events[-1])["error"])
    else:
        assert isinstance(response.json(), dict), response.text


@pytest.fixture
def fuzz_engine(redis_client, base_model):
    with FakeEngine(redis_client) as fake:
        yield fake


@pytest.fixture
def v1_auth(tenant_a) -> dict[str, str]:
    """A key of a tenant without request limits, so the fuzz reaches the parser and the serving path."""
    tenant = tenant_a[0]
    tenant.requests_per_minute = tenant.tokens_per_minute = tenant.max_in_flight = None
    tenant.save()
    return {"Authorization": f"Bearer {factories.api_key_for(tenant, scopes=('inference',))[1]}",
            "Content-Type": "application/json"}


@pytest.mark.parametrize(("path", "bodies"), [("/v1/chat/completions", chat_bodies),
                                            ("/v1/completions", completion_bodies)])
def test_v1_bodies_answer_no_5xx(fuzz_engine, v1_auth, path, bodies):
    seen: Counter = Counter()

    @settings(FUZZ, max_examples=V1_EXAMPLES)
    @given(body=bodies)
    def fuzz(body):
        check(send("POST", path, dumps(body), v1_auth), seen)

    fuzz()
    assert seen[200] and seen[400], seen  # both the serving path and the refusals were reached


def header_bytes(prefix: bytes) -> st.SearchStrategy:
    """``prefix`` and any bytes a header line can hold (no CR, LF or NUL)."""
    return st.binary(max_size=40).map(lambda raw: prefix + bytes(b for b in raw if b not in b"\r\n\0"))


authorizations = st.none() | header_bytes(b"Bearer ") | header_bytes(b"Bearer lf_") | st.sampled_from(
    ["", "Bearer", "Bearer ", "Basic Zm9vOmJhcg==", "Bearer lf_x.", "Bearer lf_nodot", "bearer  lf_a.b  "])
content_types = st.none() | header_bytes(b"") | st.sampled_from(
    ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/json; charset=latin-1"])
raw_bodies = st.binary(max_size=200) | st.sampled_from([
    b"", b"{", b"null", b"[]", b'"x"', b"1e999", b"\xff\xfe{}", b"\xed\xa0\x80", b"[" * 50_000, b'{"a":' * 50_000,
    b'{"n": ' + b"1" * 5000 + b"}", b'{"model": "random:tiny", "messages": [{"role": [], "content": "x"}]}',
    b'{"model": "random:tiny", "prompt": "\\ud800"}',
])


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_v1_bad_headers_and_bytes_answer_no_5xx(fuzz_engine, v1_auth, path):
    seen: Counter = Counter()

    @settings(FUZZ, max_examples=V1_EXAMPLES // 2)
    @given(authorization=authorizations | st.just(v1_auth["Authorization"]), content_type=content_types,
           content=raw_bodies)
    def fuzz(authorization, content_type, content):
        headers = {"Authorization": authorization, "Content-Type": content_type}
        check(send("POST", path, content, {k: v for k, v in headers.items() if v is not None}), seen)

    fuzz()
    assert seen[401] and seen[400], seen


model_paths = st.sampled_from(["/v1/models", "/v1/models/random:tiny", "/v1/models/random:tiny@1", "/v1/models/"]) | (
    st.binary(min_size=1, max_size=30).map(lambda raw: "/v1/models/" + quote_from_bytes(raw, safe="/:@")))


def test_v1_methods_and_model_paths_answer_no_5xx(fuzz_engine, v1_auth):
    seen: Counter = Counter()

    @settings(FUZZ, max_examples=V1_EXAMPLES // 3)
    @given(method=st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]), path=model_paths
           | st.sampled_from(["/v1/chat/completions", "/v1/completions"]), content=raw_bodies)
    def fuzz(method, path, content):
        response = send(method, path, content, v1_auth)
        if method == "OPTIONS" and response.status_code == 200:  # Django's own answer: the methods, no body
            assert response.headers["Allow"], response
        else:
            check(response, seen)

    fuzz()
    assert seen[200] and seen[404] and seen[405], seen
