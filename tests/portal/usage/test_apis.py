"""GET /api/v1/usage and /api/v1/usage/requests: a manage key or a signed-in member sees their own tenant's usage."""

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from portal.usage.models import Usage
from portal.usage.services import usage_record
from tests.portal import factories

pytestmark = pytest.mark.django_db
DAY = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MARCH_1 = {"since": "2026-03-01", "until": "2026-03-02"}


@pytest.fixture
def records(tenant_a, tenant_b, base_model):
    key, _secret = factories.api_key_for(tenant_a[0], name="usage key")
    for i in range(4):
        usage_record(tenant=tenant_a[0], api_key=key, request_id=f"a{i}", model="random:tiny", base_model=base_model,
                     status="ok" if i else "error", created=DAY, total_time=0.5 + i, prompt_tokens=10,
                     completion_tokens=5, time_to_first_token=0.1)
    usage_record(tenant=tenant_b[0], request_id="b0", model="random:tiny", base_model=base_model, status="ok",
                 created=DAY, total_time=1.0, prompt_tokens=999)
    return key


def test_a_manage_key_gets_its_tenants_summary(key_client, records):
    Usage.objects.filter(request_id="a1").update(cached_tokens=7)
    response = key_client.get("/api/v1/usage", MARCH_1)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["group_by"] == "adapter" and body["since"].startswith("2026-03-01T00:00:00")
    [group] = body["groups"]
    assert group["group"] == "random:tiny"
    assert (group["requests"], group["prompt_tokens"], group["completion_tokens"], group["total_tokens"]) == (
        4, 40, 20, 60)
    assert group["cached_tokens"] == 7 and group["statuses"] == {"error": 1, "ok": 3}
    assert group["total_time"] == {"p50": 2.5, "p95": pytest.approx(3.4), "p99": pytest.approx(3.48)}  # ok: 1.5, 2.5, 3.5
    assert group["time_to_first_token"]["p50"] == pytest.approx(0.1)

    by_key = key_client.get("/api/v1/usage", {**MARCH_1, "group_by": "key"}).json()["groups"]
    assert [(g["group"], g["requests"]) for g in by_key] == [(records.prefix, 4)]


def test_the_default_window_is_the_last_24_hours(key_client, tenant_a, records):
    usage_record(tenant=tenant_a[0], request_id="recent", model="m", status="ok", created=timezone.now(), total_time=1)
    usage_record(tenant=tenant_a[0], request_id="yesterday", model="m", status="ok",
                 created=timezone.now() - timedelta(hours=25), total_time=1)
    body = key_client.get("/api/v1/usage").json()
    assert [(g["group"], g["requests"]) for g in body["groups"]] == [("m", 1)]  # DAY lies further back
    since, until = datetime.fromisoformat(body["since"]), datetime.fromisoformat(body["until"])
    assert until - since == timedelta(hours=24) and abs(timezone.now() - until) < timedelta(minutes=1)
    only_until = key_client.get("/api/v1/usage", {"until": "2026-03-02"}).json()
    assert only_until["since"].startswith("2026-03-01T00:00:00") and only_until["groups"][0]["requests"] == 4


def test_a_signed_in_member_sees_it_too(tenant_a, records):
    client = APIClient()
    client.force_login(tenant_a[1])
    body = client.get("/api/v1/usage", {"since": "2026-02-15", "until": "2026-03-15", "group_by": "day"}).json()
    assert [(g["group"], g["requests"]) for g in body["groups"]] == [("2026-03-01", 4)]


def test_a_window_past_31_days_is_refused_naming_the_limit(key_client, records):
    response = key_client.get("/api/v1/usage", {"since": "2026-03-01", "until": "2026-04-02"})
    assert response.status_code == 400
    assert response.json() == {
        "detail": "a usage window spans at most 31 days, and since to until is 32 days, 0:00:00: send a later since or an "
                  "earlier until (until defaults to now), and ask for longer periods one window at a time",
        "code": "invalid",
    }
    assert key_client.get("/api/v1/usage", {"since": "2026-03-01", "until": "2026-04-01"}).status_code == 200
    assert key_client.get("/api/v1/usage", {"since": "2026-03-01"}).status_code == 400  # until: now, months on


def test_refusals(api_client, tenant_a, key_client, records):
    assert api_client.get("/api/v1/usage").status_code in (401, 403)
    assert api_client.get("/api/v1/usage/requests").status_code in (401, 403)
    _key, inference_only = factories.api_key_for(tenant_a[0], scopes=("inference",))
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {inference_only}")
    assert api_client.get("/api/v1/usage").status_code == 403
    assert api_client.get("/api/v1/usage/requests").status_code == 403
    assert key_client.get("/api/v1/usage", {"group_by": "model"}).status_code == 400
    assert key_client.get("/api/v1/usage", {"since": "yesterday"}).status_code == 400
    assert key_client.get("/api/v1/usage/requests", {"since": "yesterday"}).status_code == 400
    response = key_client.get("/api/v1/usage", {"since": "2026-03-02", "until": "2026-03-01"})
    assert response.status_code == 400 and "since must be before until" in response.json()["detail"]


def test_a_summary_takes_the_same_queries_for_many_rows(key_client, tenant_a, django_assert_max_num_queries):
    rows = lambda first, count: [  # noqa: E731
        Usage(tenant=tenant_a[0], request_id=f"r{n}", model=f"m{n % 3}", status="ok", total_time=n, created=DAY)
        for n in range(first, first + count)
    ]
    Usage.objects.bulk_create(rows(0, 3))
    with django_assert_max_num_queries(5):  # the key and its last use, then the summary's three
        few = key_client.get("/api/v1/usage", MARCH_1)
    Usage.objects.bulk_create(rows(3, 600))
    with django_assert_max_num_queries(5):
        many = key_client.get("/api/v1/usage", MARCH_1)
    assert [g["requests"] for g in few.json()["groups"]] == [1, 1, 1]
    assert [g["requests"] for g in many.json()["groups"]] == [201, 201, 201]


def walk(client, params: dict) -> list[dict]:
    """Every page from the first, following ``next``."""
    seen, response = [], client.get("/api/v1/usage/requests", params)
    while True:
        assert response.status_code == 200, response.content
        body = response.json()
        seen.extend(body["results"])
        if body["next"] is None:
            return seen
        query = parse_qs(urlsplit(body["next"]).query)
        response = client.get("/api/v1/usage/requests", {k: v[0] for k, v in query.items()})


def test_the_requests_list_walks_every_row_once_newest_first(key_client, tenant_a, tenant_b, django_assert_max_num_queries):
    key, _ = factories.api_key_for(tenant_a[0], name="lister")
    # Ties on created across page boundaries: three requests a minute.
    Usage.objects.bulk_create(
        Usage(tenant=tenant_a[0], request_id=f"a{n:03d}", model="m", status="ok", api_key=key if n % 2 else None,
              created=DAY + timedelta(minutes=n // 3), prompt_tokens=n, completion_tokens=1, cached_tokens=n % 4)
        for n in range(250)
    )
    Usage.objects.bulk_create(Usage(tenant=tenant_b[0], request_id=f"b{n}", model="m", status="ok", created=DAY)
                              for n in range(20))
    seen = walk(key_client, {"page_size": 7})
    assert sorted(r["request_id"] for r in seen) == [f"a{n:03d}" for n in range(250)]  # each once, none of B's
    assert [r["created"] for r in seen] == sorted((r["created"] for r in seen), reverse=True)
    first = seen[-1]
    assert first == {
        "request_id": "a000", "created": "2026-03-01T12:00:00Z", "model": "m", "adapter": "", "api_key": None,
        "status": "ok", "error_code": "", "stream": False, "prompt_tokens": 0, "completion_tokens": 1,
        "cached_tokens": 0, "total_tokens": 1, "time_to_first_token": None, "total_time": 0.0,
    }
    assert seen[-2]["api_key"] == key.prefix

    window = walk(key_client, {"since": "2026-03-01T12:10:00Z", "until": "2026-03-01T12:20:00Z", "page_size": 4})
    assert sorted(r["request_id"] for r in window) == [f"a{n:03d}" for n in range(30, 60)]
    with django_assert_max_num_queries(3):  # the key and its last use, then one page
        page = key_client.get("/api/v1/usage/requests").json()
    assert len(page["results"]) == 100 and page["previous"] is None  # the default page size


def test_a_page_holds_at_most_1000_requests(key_client, tenant_a):
    Usage.objects.bulk_create(Usage(tenant=tenant_a[0], request_id=f"r{n}", model="m", status="ok", created=DAY)
                              for n in range(1001))
    page = key_client.get("/api/v1/usage/requests", {"page_size": 5000}).json()
    assert len(page["results"]) == 1000 and page["next"]


def test_the_schema_documents_the_window_and_the_pages(api_client):
    schema = api_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    summary = schema["paths"]["/api/v1/usage"]["get"]
    params = {p["name"]: p for p in summary["parameters"]}
    assert {"since", "until", "group_by"} <= set(params)
    assert "at most 31 days" in params["until"]["description"] and "24 hours" in params["since"]["description"]
    listing = schema["paths"]["/api/v1/usage/requests"]["get"]
    params = {p["name"]: p for p in listing["parameters"]}
    assert {"since", "until", "cursor", "page_size"} <= set(params) and "at most 1000" in params["page_size"]["description"]
    page = listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"next", "previous", "results"} <= set(schema["components"]["schemas"][page]["properties"])
