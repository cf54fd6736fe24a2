"""The tenant usage page and its selector: buckets, groups, percentiles, periods, pages, one tenant's records only."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta

import numpy
import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from portal.ops.forms import UsagePeriodForm
from portal.usage.errors import UsageError
from portal.usage.models import Usage
from portal.usage.selectors import OTHER, usage_report
from portal.usage.services import usage_record
from tests.portal import factories

pytestmark = pytest.mark.django_db
SINCE = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)


def record(tenant, n: int, model: str, at: datetime, **fields):
    """A record served under ``model`` (no base model: the page groups it under that name)."""
    defaults = dict(status="ok", total_time=1.0, prompt_tokens=10, completion_tokens=5)
    return usage_record(tenant=tenant, request_id=f"{tenant.slug}-{n}", model=model, created=at, **{**defaults, **fields})


def test_report_buckets_requests_tokens_and_latency_per_adapter(tenant_a):
    tenant = tenant_a[0]
    for n, total in enumerate((1.0, 2.0, 3.0, 4.0)):
        record(tenant, n, "bot@1", SINCE + timedelta(hours=2, minutes=n), total_time=total)
    record(tenant, 10, "bot@1", SINCE + timedelta(hours=5), status="error", total_time=99.0)
    record(tenant, 11, "pirate@2", SINCE + timedelta(hours=23, minutes=59), prompt_tokens=7, completion_tokens=0)
    report = usage_report(tenant=tenant, since=SINCE, until=SINCE + timedelta(days=1))
    assert report.bucket == timedelta(hours=1) and len(report.bucket_starts) == 24
    bot, pirate = report.series
    assert (bot.group, pirate.group) == ("bot@1", "pirate@2")
    assert bot.requests[2] == 4 and bot.requests[5] == 1 and sum(bot.requests) == 5
    assert bot.tokens[2] == 60 and pirate.requests[23] == 1 and pirate.tokens[23] == 7
    assert bot.total_time_p50[2] == pytest.approx(2.5) and bot.total_time_p95[2] == pytest.approx(3.85)
    assert bot.total_time_p50[5] is None  # only an error there: no latency, a gap in the line
    assert report.requests == 6 and report.tokens == 5 * 15 + 7


def test_report_keeps_eight_lines_and_adds_the_rest_under_other(tenant_a):
    tenant = tenant_a[0]
    for n in range(12):
        for i in range(12 - n):
            record(tenant, n * 100 + i, f"adapter-{n:02d}@1", SINCE + timedelta(days=n % 3))
    report = usage_report(tenant=tenant, since=SINCE, until=SINCE + timedelta(days=7), group_by="adapter")
    assert report.bucket == timedelta(days=1)
    assert [s.group for s in report.series] == [f"adapter-{n:02d}@1" for n in range(8)] + [OTHER]
    assert sum(report.series[-1].requests) == 4 + 3 + 2 + 1
    assert len(report.summary) == 12  # the table lists every adapter


def test_usage_page_shows_the_tenant_own_usage_per_adapter_and_per_key(tenant_a, tenant_b):
    tenant, user = tenant_a
    key, _ = factories.api_key_for(tenant, name="production")
    now = datetime.now(UTC)
    for n, total in enumerate((0.2, 0.4, 0.6)):
        record(tenant, n, "bot@1", now - timedelta(hours=n), api_key=key, total_time=total, time_to_first_token=0.1)
    record(tenant, 9, "bot@1", now - timedelta(days=3), api_key=key)  # outside the last 24 hours
    record(tenant_b[0], 1, "secret@1", now)
    client = Client()
    client.force_login(user)

    html = client.get("/usage/").content.decode()
    row = re.search(r'<tr data-group="bot@1">(.*?)</tr>', html, re.S).group(1)
    assert re.search(r'data-stat="requests">3<', row) and re.search(r'data-stat="prompt_tokens">30<', row)
    assert "400 ms · 580 ms · 596 ms" in row  # p50 · p95 · p99 of 0.2, 0.4, 0.6 s
    assert "secret" not in html and html.count('<path class="series"') == 4
    by_key = client.get("/usage/", {"group": "key", "period": "7d"}).content.decode()
    row = re.search(rf'<tr data-group="{key.prefix}">(.*?)</tr>', by_key, re.S).group(1)
    assert "production" in row and re.search(r'data-stat="requests">4<', row)


def test_usage_page_periods(tenant_a):
    client = Client()
    assert client.get("/usage/").status_code == 302  # sign in first
    client.force_login(tenant_a[1])
    empty = client.get("/usage/", {"period": "custom", "since": "2026-03-01", "until": "2026-03-03"})
    assert empty.status_code == 200 and b'id="usage-empty"' in empty.content
    assert b"2026-03-01 00:00 to 2026-03-03 23:59 UTC, per day" in empty.content
    longest = client.get("/usage/", {"period": "custom", "since": "2026-03-01", "until": "2026-03-31"})
    assert longest.status_code == 200 and b"2026-03-01 00:00 to 2026-03-31 23:59 UTC" in longest.content
    too_long = client.get("/usage/", {"period": "custom", "since": "2026-03-01", "until": "2026-04-01"})
    assert too_long.status_code == 400
    assert b"choose at most 31 days; see a longer period one part at a time" in too_long.content
    backwards = client.get("/usage/", {"period": "custom", "since": "2026-03-03", "until": "2026-03-01"})
    assert backwards.status_code == 400 and b"comes after its last" in backwards.content
    assert client.get("/usage/", {"period": "custom"}).status_code == 400
    assert client.get("/usage/", {"group": "tenant"}).status_code == 400


def test_preset_periods_end_on_the_next_whole_hour_or_day():
    form = UsagePeriodForm({"period": "24h"})
    assert form.is_valid()
    now = datetime(2026, 3, 1, 10, 25, tzinfo=UTC)
    assert form.period_range(now) == (datetime(2026, 2, 28, 11, tzinfo=UTC), datetime(2026, 3, 1, 11, tzinfo=UTC))
    form = UsagePeriodForm({"period": "30d"})
    assert form.is_valid()
    assert form.period_range(now) == (datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))


def test_the_report_refuses_a_window_past_31_days(tenant_a):
    with pytest.raises(UsageError, match="spans at most 31 days"):
        usage_report(tenant=tenant_a[0], since=SINCE, until=SINCE + timedelta(days=32))


def test_report_series_equal_a_naive_computation(tenant_a, tenant_b):
    tenant = tenant_a[0]
    rng = random.Random(11)
    rows = [dict(model=f"adapter-{rng.randint(0, 11):02d}@1", status=rng.choice(["ok", "ok", "ok", "error"]),
                 total_time=round(rng.lognormvariate(0, 1), 4), prompt_tokens=rng.randint(0, 99),
                 completion_tokens=rng.randint(0, 99), portal_reported=rng.random() < 0.95,
                 created=SINCE + timedelta(minutes=rng.randint(0, 7 * 24 * 60 - 1))) for _ in range(600)]
    Usage.objects.bulk_create(Usage(tenant=tenant, request_id=f"r{n}", **row) for n, row in enumerate(rows))
    Usage.objects.bulk_create(Usage(tenant=tenant_b[0], request_id=f"b{n}", model="adapter-00@1", status="ok",
                                    created=SINCE) for n in range(30))
    report = usage_report(tenant=tenant, since=SINCE, until=SINCE + timedelta(days=7))
    requests = {}
    for row in rows:
        requests[row["model"]] = requests.get(row["model"], 0) + 1
    shown = sorted(requests, key=lambda m: (-requests[m], m))[:8]
    assert [s.group for s in report.series] == sorted(shown) + [OTHER]
    for series in report.series:
        for day in range(7):
            inside = [r for r in rows if (r["model"] in shown) == (series.group != OTHER)
                      and (series.group == OTHER or r["model"] == series.group)
                      and r["created"].date() == (SINCE + timedelta(days=day)).date()]
            assert series.requests[day] == len(inside)
            assert series.tokens[day] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in inside)
            latencies = [r["total_time"] for r in inside if r["status"] == "ok" and r["portal_reported"]]
            if latencies:
                p50, p95 = numpy.percentile(latencies, [50, 95])
                assert (series.total_time_p50[day], series.total_time_p95[day]) == (pytest.approx(p50), pytest.approx(p95))
            else:
                assert series.total_time_p50[day] is None and series.total_time_p95[day] is None


def test_the_page_takes_the_same_few_queries_for_many_rows(tenant_a):
    tenant, user = tenant_a
    client = Client()
    client.force_login(user)
    now = datetime.now(UTC)
    counts = []
    for count in (5, 500):
        Usage.objects.bulk_create(
            Usage(tenant=tenant, request_id=f"r{count}-{n}", model=f"adapter-{n % 12}@1", status="ok", total_time=n,
                  created=now - timedelta(minutes=n % 600)) for n in range(count))
        for group in ("adapter", "key"):
            with CaptureQueriesContext(connection) as queries:
                assert client.get("/usage/", {"group": group}).status_code == 200
            counts.append(len(queries))
    # The session, its user and membership, the page's tenant menu: 5; the summary 3, the series 2, the key names 1.
    assert counts[:2] == counts[2:] and max(counts) <= 11


def test_the_page_lists_the_groups_fifty_at_a_time(tenant_a):
    tenant, user = tenant_a
    client = Client()
    client.force_login(user)
    now = datetime.now(UTC)
    Usage.objects.bulk_create(Usage(tenant=tenant, request_id=f"r{n}", model=f"adapter-{n:03d}@1", status="ok",
                                    created=now - timedelta(hours=1)) for n in range(120))
    seen, html = [], client.get("/usage/", {"period": "7d"}).content.decode()
    while True:
        seen += re.findall(r'<tr data-group="([^"]+)">', html)
        assert '<strong id="usage-requests">120</strong>' in html  # the totals cover every group
        following = re.search(r'<a href="\?([^"]+)">Next', html)
        if following is None:
            break
        query = following.group(1).replace("&amp;", "&")
        assert "period=7d" in query
        html = client.get(f"/usage/?{query}").content.decode()
    assert seen == [f"adapter-{n:03d}@1" for n in range(120)]
    assert "101–120 of 120" in html
