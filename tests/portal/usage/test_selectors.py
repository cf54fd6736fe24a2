import random
from datetime import UTC, datetime, timedelta

import numpy
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from portal.usage.errors import UsageError
from portal.usage.models import Usage
from portal.usage.selectors import (
    DEFAULT_WINDOW,
    MAX_WINDOW,
    percentiles,
    usage_list,
    usage_summary,
    usage_window,
)
from portal.usage.services import usage_record
from tests.portal import factories

pytestmark = pytest.mark.django_db
DAY = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MARCH = {"since": datetime(2026, 3, 1, tzinfo=UTC), "until": datetime(2026, 3, 31, tzinfo=UTC)}


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

    summary = usage_summary(tenant=tenant, **MARCH)
    assert (summary.since, summary.until, summary.group_by) == (MARCH["since"], MARCH["until"], "adapter")
    by_adapter = {g.group: g for g in summary.groups}
    assert set(by_adapter) == {"random:tiny", "nope"}
    tiny = by_adapter["random:tiny"]
    assert (tiny.requests, tiny.prompt_tokens, tiny.completion_tokens) == (11, 100, 45 + 4)
    assert tiny.statuses == {"cancelled": 1, "ok": 10}
    assert tiny.total_time["p50"] == pytest.approx(5.5)  # ok requests only: 1..10
    assert tiny.time_to_first_token["p99"] == pytest.approx(0.991)
    assert by_adapter["nope"].statuses == {"error": 1} and by_adapter["nope"].total_time["p50"] is None

    by_key = {g.group: g.requests for g in usage_summary(tenant=tenant, group_by="key", **MARCH).groups}
    assert by_key == {key.prefix: 5, "-": 7}
    by_day = {g.group: g.requests for g in usage_summary(tenant=tenant, group_by="day", **MARCH).groups}
    assert by_day == {"2026-03-01": 7, "2026-03-02": 5}
    window = usage_summary(tenant=tenant, since=DAY + timedelta(hours=1), until=DAY + timedelta(days=2))
    assert sum(g.requests for g in window.groups) == 5


def test_the_window_defaults_to_the_last_24_hours(tenant_a):
    before = timezone.now()
    since, until = usage_window()
    assert before <= until <= timezone.now() and until - since == DEFAULT_WINDOW == timedelta(hours=24)
    assert usage_window(until=DAY) == (DAY - DEFAULT_WINDOW, DAY)
    record(tenant_a[0], 1, created=timezone.now() - timedelta(hours=1))
    record(tenant_a[0], 2, created=timezone.now() - timedelta(hours=25))
    summary = usage_summary(tenant=tenant_a[0])
    assert [g.requests for g in summary.groups] == [1] and summary.until - summary.since == DEFAULT_WINDOW


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_by": "model"}, "group_by must be one of"),
    ({"since": DAY, "until": DAY}, "since must be before until"),
    ({"since": DAY, "until": DAY + timedelta(days=31, seconds=1)}, "spans at most 31 days, and since to until is 31 days, 0:00:01"),
    ({"since": DAY}, "a usage window spans at most 31 days"),  # until defaults to now, months later
    ({"until": datetime(1, 1, 1, 1, tzinfo=UTC)}, "send a since too"),
])
def test_summary_refuses_bad_queries(tenant_a, kwargs, message):
    with pytest.raises(UsageError, match=message):
        usage_summary(tenant=tenant_a[0], **kwargs)


def test_the_longest_window_is_accepted(tenant_a):
    assert usage_summary(tenant=tenant_a[0], since=DAY, until=DAY + MAX_WINDOW).groups == []


def bulk(tenant, rows: list[dict]) -> None:
    Usage.objects.bulk_create(Usage(tenant=tenant, request_id=f"{tenant.slug}-bulk-{n}", **row) for n, row in enumerate(rows))


def random_rows(rng: random.Random, count: int, keys: list, base_model) -> list[dict]:
    rows = []
    for _ in range(count):
        status = rng.choice(["ok"] * 6 + ["error", "cancelled", "timeout"])
        rows.append(dict(
            model=rng.choice(["bot@1", "bot@2", "random:tiny", "typo"]),
            api_key=rng.choice(keys + [None]),
            base_model=base_model if rng.random() < 0.5 else None,
            status=status,
            prompt_tokens=rng.randint(0, 500), completion_tokens=rng.randint(0, 300), cached_tokens=rng.randint(0, 50),
            time_to_first_token=None if rng.random() < 0.2 else round(rng.lognormvariate(-2, 1), 4),
            total_time=round(rng.lognormvariate(0, 1), 4),
            portal_reported=rng.random() < 0.9,  # an engine-only record: no timings, not in the latencies
            created=DAY + timedelta(minutes=rng.randint(-3000, 3000)),
        ))
    for row in rows:
        row["adapter"] = row["model"] if "@" in row["model"] else ""
    return rows


def naive_groups(rows: list[dict], label) -> dict:
    """The summary, computed the plain way: every row in Python, numpy's percentiles."""
    groups: dict = {}
    for row in rows:
        group = groups.setdefault(label(row), {"requests": 0, "prompt": 0, "completion": 0, "cached": 0,
                                               "statuses": {}, "ttft": [], "total": []})
        group["requests"] += 1
        group["prompt"] += row["prompt_tokens"]
        group["completion"] += row["completion_tokens"]
        group["cached"] += row["cached_tokens"]
        group["statuses"][row["status"]] = group["statuses"].get(row["status"], 0) + 1
        if row["status"] == "ok" and row["portal_reported"]:
            group["total"].append(row["total_time"])
            if row["time_to_first_token"] is not None:
                group["ttft"].append(row["time_to_first_token"])
    return groups


def assert_percentiles(found: dict, values: list[float]) -> None:
    if not values:
        assert found == {"p50": None, "p95": None, "p99": None}
        return
    expected = numpy.percentile(values, [50, 95, 99])
    assert [found["p50"], found["p95"], found["p99"]] == pytest.approx(list(expected), rel=1e-9)


@pytest.mark.parametrize("group_by", ["adapter", "key", "day"])
def test_summary_equals_a_naive_computation(tenant_a, tenant_b, base_model, group_by):
    tenant = tenant_a[0]
    keys = [factories.api_key_for(tenant, name=f"k{i}")[0] for i in range(3)]
    rng = random.Random(7)
    rows = random_rows(rng, 400, keys, base_model)
    bulk(tenant, rows)
    bulk(tenant_b[0], random_rows(rng, 50, [], base_model))
    since, until = DAY - timedelta(days=1), DAY + timedelta(days=1)
    inside = [row for row in rows if since <= row["created"] < until]
    label = {
        "adapter": lambda row: row["adapter"] or (row["base_model"].name if row["base_model"] else row["model"]),
        "key": lambda row: row["api_key"].prefix if row["api_key"] else "-",
        "day": lambda row: row["created"].date().isoformat(),
    }[group_by]
    expected = naive_groups(inside, label)

    found = {g.group: g for g in usage_summary(tenant=tenant, since=since, until=until, group_by=group_by).groups}
    assert list(found) == sorted(expected) and len(inside) < len(rows)
    for name, want in expected.items():
        group = found[name]
        assert (group.requests, group.prompt_tokens, group.completion_tokens, group.cached_tokens) == (
            want["requests"], want["prompt"], want["completion"], want["cached"])
        assert group.statuses == dict(sorted(want["statuses"].items()))
        assert_percentiles(group.total_time, want["total"])
        assert_percentiles(group.time_to_first_token, want["ttft"])


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 19, 20, 21, 99, 100, 101, 201])
def test_database_percentiles_match_numpy_at_every_size(tenant_a, size):
    """Each size puts the ranks somewhere else between two values (or on one): the integer arithmetic in SQL."""
    values = [float(v * v % 97) for v in range(size)]
    bulk(tenant_a[0], [dict(model="m", status="ok", total_time=v, created=DAY) for v in values])
    [group] = usage_summary(tenant=tenant_a[0], since=DAY, until=DAY + timedelta(hours=1)).groups
    assert_percentiles(group.total_time, values)


def test_a_summary_takes_the_same_few_queries_for_many_rows(tenant_a, base_model):
    tenant = tenant_a[0]
    keys = [factories.api_key_for(tenant, name=f"k{i}")[0] for i in range(3)]
    rng = random.Random(3)
    window = {"since": DAY - timedelta(days=3), "until": DAY + timedelta(days=3)}
    counts = []
    for count in (5, 500):
        bulk(tenant, random_rows(rng, count, keys, base_model))
        for group_by in ("adapter", "key", "day"):
            with CaptureQueriesContext(connection) as queries:
                usage_summary(tenant=tenant, group_by=group_by, **window)
            counts.append(len(queries))
        Usage.objects.all().delete()
    assert counts[:3] == counts[3:] and max(counts) <= 3


def test_the_list_is_newest_first_and_scoped(tenant_a, tenant_b):
    bulk(tenant_a[0], [dict(model="m", status="ok", created=DAY + timedelta(minutes=n % 3)) for n in range(6)])
    bulk(tenant_b[0], [dict(model="m", status="ok", created=DAY)])
    listed = list(usage_list(tenant=tenant_a[0], since=DAY + timedelta(minutes=1)))
    assert [(u.created, u.pk) for u in listed] == sorted(((u.created, u.pk) for u in listed), reverse=True)
    assert len(listed) == 4 and {u.tenant_id for u in listed} == {tenant_a[0].pk}


def test_an_until_too_early_for_the_default_window_is_refused():
    with pytest.raises(UsageError) as caught:
        usage_window(until=datetime(1, 1, 1, 12, tzinfo=UTC))
    assert caught.value.code == "invalid" and "send a since" in caught.value.message
