from datetime import UTC, datetime, timedelta

import pytest

from portal.usage.errors import UsageError
from portal.usage.models import Usage
from portal.usage.selectors import percentiles, usage_summary
from portal.usage.services import usage_record
from tests.portal import factories

pytestmark = pytest.mark.django_db
DAY = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def record(tenant, n, **fields):
    defaults = dict(model="m", status="ok", created=DAY, total_time=1.0)
    return usage_record(tenant=tenant, request_id=f"{tenant.slug}-{n}", **{**defaults, **fields})


def test_percentiles_interpolate_like_numpy():
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None}
    assert percentiles([3.0]) == {"p50": 3.0, "p95": 3.0, "p99": 3.0}
    values = [float(v) for v in range(1, 101)]  # numpy.percentile(1..100, [50, 95, 99]) = 50.5, 95.05, 99.01
    found = percentiles(values[::-1])
    assert found["p50"] == pytest.approx(50.5) and found["p95"] == pytest.approx(95.05)
    assert found["p99"] == pytest.approx(99.01)


def test_record_is_idempotent_per_request_id(tenant_a):
    first = record(tenant_a[0], 1, prompt_tokens=3)
    again = record(tenant_a[0], 1, prompt_tokens=99)
    assert first.pk == again.pk and Usage.objects.get().prompt_tokens == 3


def test_summary_groups_by_adapter_key_and_day(tenant_a, tenant_b, base_model):
    tenant = tenant_a[0]
    key, _ = factories.api_key_for(tenant)
    for i in range(10):
        record(tenant, i, base_model=base_model, model="random:tiny", api_key=key if i % 2 else None,
               prompt_tokens=10, completion_tokens=i, time_to_first_token=0.1 * (i + 1), total_time=float(i + 1),
               created=DAY + timedelta(days=i // 5))
    record(tenant, 10, model="nope", status="error", error_code="model_not_found", total_time=0.01)
    record(tenant, 11, model="random:tiny", base_model=base_model, status="cancelled", completion_tokens=4)
    record(tenant_b[0], 1, model="random:tiny", base_model=base_model, prompt_tokens=1000)  # never in A's summary

    by_adapter = {g.group: g for g in usage_summary(tenant=tenant)}
    assert set(by_adapter) == {"random:tiny", "nope"}
    tiny = by_adapter["random:tiny"]
    assert (tiny.requests, tiny.prompt_tokens, tiny.completion_tokens) == (11, 100, 45 + 4)
    assert tiny.statuses == {"cancelled": 1, "ok": 10}
    assert tiny.total_time["p50"] == pytest.approx(5.5)  # ok requests only: 1..10
    assert tiny.time_to_first_token["p99"] == pytest.approx(0.991)
    assert by_adapter["nope"].statuses == {"error": 1} and by_adapter["nope"].total_time["p50"] is None

    by_key = {g.group: g.requests for g in usage_summary(tenant=tenant, group_by="key")}
    assert by_key == {key.prefix: 5, "-": 7}
    by_day = {g.group: g.requests for g in usage_summary(tenant=tenant, group_by="day")}
    assert by_day == {"2026-03-01": 7, "2026-03-02": 5}
    window = usage_summary(tenant=tenant, since=DAY + timedelta(hours=1), until=DAY + timedelta(days=2))
    assert sum(g.requests for g in window) == 5


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_by": "model"}, "group_by must be one of"),
    ({"since": DAY, "until": DAY}, "since must be before until"),
])
def test_summary_refuses_bad_queries(tenant_a, kwargs, message):
    with pytest.raises(UsageError, match=message):
        usage_summary(tenant=tenant_a[0], **kwargs)
