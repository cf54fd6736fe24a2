"""GET /api/v1/usage: a manage key or a signed-in member sees their own tenant's usage, grouped."""

from datetime import UTC, datetime

import pytest
from rest_framework.test import APIClient

from portal.usage.services import usage_record
from tests.portal import factories

pytestmark = pytest.mark.django_db
DAY = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


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
    response = key_client.get("/api/v1/usage", {"since": "2026-03-01", "until": "2026-03-02"})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["group_by"] == "adapter" and body["since"].startswith("2026-03-01T00:00:00")
    [group] = body["groups"]
    assert group["group"] == "random:tiny"
    assert (group["requests"], group["prompt_tokens"], group["completion_tokens"], group["total_tokens"]) == (
        4, 40, 20, 60)
    assert group["statuses"] == {"error": 1, "ok": 3}
    assert group["total_time"] == {"p50": 2.5, "p95": pytest.approx(3.4), "p99": pytest.approx(3.48)}  # ok: 1.5, 2.5, 3.5
    assert group["time_to_first_token"]["p50"] == pytest.approx(0.1)

    by_key = key_client.get("/api/v1/usage", {"since": "2026-03-01", "group_by": "key"}).json()["groups"]
    assert [(g["group"], g["requests"]) for g in by_key] == [(records.prefix, 4)]


def test_the_default_window_is_the_last_30_days(key_client, records):
    assert key_client.get("/api/v1/usage").json()["groups"] == []  # DAY lies further back


def test_a_signed_in_member_sees_it_too(tenant_a, records):
    client = APIClient()
    client.force_login(tenant_a[1])
    body = client.get("/api/v1/usage", {"since": "2026-01-01", "group_by": "day"}).json()
    assert [(g["group"], g["requests"]) for g in body["groups"]] == [("2026-03-01", 4)]


def test_refusals(api_client, tenant_a, key_client, records):
    assert api_client.get("/api/v1/usage").status_code in (401, 403)
    _key, inference_only = factories.api_key_for(tenant_a[0], scopes=("inference",))
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {inference_only}")
    assert api_client.get("/api/v1/usage").status_code == 403
    assert key_client.get("/api/v1/usage", {"group_by": "model"}).status_code == 400
    assert key_client.get("/api/v1/usage", {"since": "yesterday"}).status_code == 400
    response = key_client.get("/api/v1/usage", {"since": "2026-03-02", "until": "2026-03-01"})
    assert response.status_code == 400 and "since must be before until" in response.json()["detail"]
