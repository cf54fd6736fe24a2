"""The portal's /metrics (django-prometheus): open to scrapers, parseable, and off when the setting says so."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.django_db


def test_portal_metrics_parse_and_count_requests(client, tenant_a):
    client.force_login(tenant_a[1])
    assert client.get("/adapters/").status_code == 200
    client.logout()
    response = client.get("/metrics")  # no login: Prometheus does not have one
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.content.decode())}
    for name in ("django_http_requests_total_by_method", "django_http_responses_total_by_status",
                 "django_http_requests_latency_seconds_by_view_method", "django_http_requests_before_middlewares",
                 "django_http_responses_before_middlewares"):
        assert name in families, name
    views = {sample.labels.get("view") for sample in families["django_http_requests_latency_seconds_by_view_method"].samples}
    assert "adapters:list" in views


def test_portal_metrics_can_be_turned_off(client, settings):
    settings.LORAFLEET_PORTAL_METRICS = False
    assert client.get("/metrics").status_code == 404
