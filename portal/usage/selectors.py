"""Usage reads, scoped to one tenant; a summary or report covers a bounded window.

A summary covers ``since <= created < until``: ``until`` defaults to now, ``since`` to ``DEFAULT_WINDOW``
before it, and a window longer than ``MAX_WINDOW`` is refused. So one tenant's report reads a bounded slice
of the ``(tenant, created)`` index, and the database does the work: counts and sums are aggregates, and
latency percentiles use window functions that rank each group's values and return only the rows at the
ranks a percentile needs. The SQL is the same on SQLite and PostgreSQL. A few queries per summary, and a few
rows per group reach Python, however many requests the window holds. ``percentiles`` is the plain
specification they follow (numpy's linear interpolation). Lists are for cursor pagination: newest first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.db.models import Case, Count, F, Q, QuerySet, Sum, Value, When, Window
from django.db.models.expressions import Combinable
from django.db.models.functions import Coalesce, NullIf, RowNumber, Trunc, TruncDate
from django.utils import timezone

from portal.api_keys.models import TenantAPIKey
from portal.common.errors import INVALID
from portal.tenants.models import Tenant
from portal.usage.errors import UsageError
from portal.usage.models import Usage

GROUPINGS = ("adapter", "key", "day")
PERCENTILES = (50, 95, 99)
DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=31)
USAGE_MAX_GROUPS = 8  # lines per chart; the rest add up under "other"
OTHER = "other"

Percentiles = dict[str, float | None]


@dataclass
class UsageGroup:
    """The requests of one adapter, key or day. Latency percentiles cover the requests that ended ``ok``
    and whose timings the portal recorded."""

    group: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    time_to_first_token: Percentiles = field(default_factory=lambda: percentiles([]))
    total_time: Percentiles = field(default_factory=lambda: percentiles([]))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class UsageSummary:
    since: datetime
    until: datetime
    group_by: str
    groups: list[UsageGroup]


@dataclass
class UsageSeries:
    """One adapter's or key's requests, tokens and latency per bucket (latency as in ``UsageGroup``)."""

    group: str
    requests: list[int]
    tokens: list[int]
    total_time_p50: list[float | None]
    total_time_p95: list[float | None]


@dataclass
class UsageReport:
    since: datetime
    until: datetime
    bucket: timedelta
    bucket_starts: list[datetime]
    group_by: str
    series: list[UsageSeries]
    summary: list[UsageGroup]
    key_names: dict[str, str]  # key prefix → its name, for group_by="key"

    @property
    def requests(self) -> int:
        return sum(group.requests for group in self.summary)

    @property
    def tokens(self) -> int:
        return sum(group.total_tokens for group in self.summary)


def usage_window(*, since: datetime | None = None, until: datetime | None = None) -> tuple[datetime, datetime]:
    """``(since, until)`` with the defaults filled in; refused when backwards or longer than ``MAX_WINDOW``."""
    until = until or timezone.now()
    if since is None:
        try:
            since = until - DEFAULT_WINDOW
        except OverflowError:  # until is within the default window of the year 1
            raise UsageError("until is too early to have a default window before it; send a since too",
                             code=INVALID) from None
    if since >= until:
        raise UsageError("since must be before until", code=INVALID)
    if until - since > MAX_WINDOW:
        raise UsageError(
            f"a usage window spans at most {MAX_WINDOW.days} days, and since to until is {until - since}: "
            "send a later since or an earlier until (until defaults to now), and ask for longer periods "
            "one window at a time",
            code=INVALID,
        )
    return since, until


def usage_list(*, tenant: Tenant, since: datetime | None = None, until: datetime | None = None) -> QuerySet[Usage]:
    """The tenant's records with ``since <= created < until``, newest first (the id breaks ties)."""
    records = Usage.objects.filter(tenant=tenant)
    if since is not None:
        records = records.filter(created__gte=since)
    if until is not None:
        records = records.filter(created__lt=until)
    return records.select_related("api_key").order_by("-created", "-id")


def usage_summary(
    *, tenant: Tenant, since: datetime | None = None, until: datetime | None = None, group_by: str = "adapter"
) -> UsageSummary:
    """Requests, tokens, outcomes and p50/p95/p99 latencies per adapter (``name@N``, or the base model's
    name), per API key (its prefix; ``-`` for none) or per UTC day (``YYYY-MM-DD``), sorted by group."""
    if group_by not in GROUPINGS:
        raise UsageError(f"group_by must be one of {list(GROUPINGS)}, got {group_by!r}", code=INVALID)
    since, until = usage_window(since=since, until=until)
    records = _records(tenant=tenant, since=since, until=until).annotate(label=_group_label(group_by))
    groups: dict[str, UsageGroup] = {}
    rows = records.values("label", "status").annotate(
        requests=Count("pk"), prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
        cached=Sum("cached_tokens"),
    )
    for row in rows:
        label = str(row["label"])  # a day is a date
        group = groups.setdefault(label, UsageGroup(label))
        group.requests += row["requests"]
        group.prompt_tokens += row["prompt"]
        group.completion_tokens += row["completion"]
        group.cached_tokens += row["cached"]
        group.statuses[row["status"]] = row["requests"]

    def per_group(column: str) -> dict[str, Percentiles]:
        return {str(label): found for (label,), found in _percentiles_by(records, keys=("label",), column=column).items()}

    ttfts, totals = per_group("time_to_first_token"), per_group("total_time")
    for group in groups.values():
        group.statuses = dict(sorted(group.statuses.items()))
        group.time_to_first_token = ttfts.get(group.group, group.time_to_first_token)
        group.total_time = totals.get(group.group, group.total_time)
    return UsageSummary(since=since, until=until, group_by=group_by, groups=[groups[g] for g in sorted(groups)])


def usage_bucket_for(*, since: datetime, until: datetime) -> timedelta:
    """An hour up to two days, else a day: a chart of 24 to 48 hours or of up to 31 days."""
    return timedelta(hours=1) if until - since <= timedelta(days=2) else timedelta(days=1)


def usage_report(*, tenant: Tenant, since: datetime, until: datetime, group_by: str = "adapter") -> UsageReport:
    """The tenant's usage in [since, until): the per-group summary, and per-bucket series for the charts.

    Buckets are whole UTC hours or days, counted from ``since`` (the usage page's periods start on one).
    The ``USAGE_MAX_GROUPS`` busiest groups get a line each, the rest add up under ``OTHER``.
    """
    if group_by == "day":
        raise UsageError("the usage report groups by adapter or key; its charts are per day already", code=INVALID)
    summary = usage_summary(tenant=tenant, since=since, until=until, group_by=group_by).groups
    bucket = usage_bucket_for(since=since, until=until)
    count = max(1, math.ceil((until - since) / bucket))
    ranked = sorted(summary, key=lambda g: (-g.requests, g.group))
    shown = ranked[:USAGE_MAX_GROUPS] if len(ranked) > USAGE_MAX_GROUPS + 1 else ranked
    shown_labels = {g.group for g in shown}
    names = [g.group for g in summary if g.group in shown_labels] + ([OTHER] if len(shown) < len(summary) else [])

    line = Case(When(label__in=shown_labels, then=F("label")), default=Value(OTHER))
    records = _records(tenant=tenant, since=since, until=until).annotate(
        label=_group_label(group_by), line=line,
        bucket=Trunc("created", "hour" if bucket == timedelta(hours=1) else "day", tzinfo=UTC),
    )

    def index(start: datetime) -> int:
        return min(count - 1, max(0, int((start - since) / bucket)))

    requests = {name: [0] * count for name in names}
    tokens = {name: [0] * count for name in names}
    p50s: dict[str, list[float | None]] = {name: [None] * count for name in names}
    p95s: dict[str, list[float | None]] = {name: [None] * count for name in names}
    rows = records.values("line", "bucket").annotate(
        requests=Count("pk"), tokens=Sum("prompt_tokens") + Sum("completion_tokens")
    )
    for row in rows:
        if row["line"] in requests:  # else a group whose first request arrived after the summary was read
            requests[row["line"]][index(row["bucket"])] += row["requests"]
            tokens[row["line"]][index(row["bucket"])] += row["tokens"]
    latency = _percentiles_by(records, keys=("line", "bucket"), column="total_time", points=(50, 95))
    for (name, start), found in latency.items():
        if name in p50s:
            p50s[name][index(start)], p95s[name][index(start)] = found["p50"], found["p95"]
    series = [UsageSeries(group=name, requests=requests[name], tokens=tokens[name], total_time_p50=p50s[name],
                          total_time_p95=p95s[name]) for name in names]
    key_names = {}
    if group_by == "key":
        key_names = dict(TenantAPIKey.objects.filter(tenant=tenant).values_list("prefix", "name"))
    return UsageReport(
        since=since, until=until, bucket=bucket, bucket_starts=[since + bucket * i for i in range(count)],
        group_by=group_by, series=series, summary=summary, key_names=key_names,
    )


def percentiles(values: list[float], points: tuple[int, ...] = PERCENTILES) -> Percentiles:
    """``{"p50": .., "p95": .., "p99": ..}`` by linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    return {f"p{p}": _interpolate(ordered.__getitem__, len(ordered), p) for p in points}


def _interpolate(value_at: Callable[[int], float], size: int, point: int) -> float | None:
    """The ``point``-th percentile of ``size`` sorted values, ``value_at(rank)`` giving the one at a 0-based rank."""
    if not size:
        return None
    rank = (size - 1) * point / 100
    low, high = math.floor(rank), math.ceil(rank)
    return value_at(low) + (value_at(high) - value_at(low)) * (rank - low)


def _records(*, tenant: Tenant, since: datetime, until: datetime) -> QuerySet[Usage]:
    # No ordering: an aggregate's GROUP BY would take in the ordering's columns.
    return Usage.objects.filter(tenant=tenant, created__gte=since, created__lt=until).order_by()


def _group_label(group_by: str) -> Combinable:
    if group_by == "adapter":
        return Coalesce(NullIf(F("adapter"), Value("")), F("base_model__name"), F("model"))
    if group_by == "key":
        return Coalesce(F("api_key__prefix"), Value("-"))
    return TruncDate("created", tzinfo=UTC)


def _percentiles_by(
    records: QuerySet[Usage], *, keys: tuple[str, ...], column: str, points: tuple[int, ...] = PERCENTILES
) -> dict[tuple, Percentiles]:
    """The percentiles of ``column`` per value of ``keys`` (annotations of ``records``), over the requests that
    ended ok with timings recorded (an engine-only record has none).

    The database numbers each group's values in order (``position``, from 1) and counts them (``size``); only
    the two values around each percentile's rank, ``(size - 1) * p / 100``, come back to be interpolated.
    """
    partition = [F(key) for key in keys]
    ranked = records.filter(status=Usage.Status.OK, portal_reported=True, **{f"{column}__isnull": False}).annotate(
        position=Window(RowNumber(), partition_by=partition, order_by=F(column).asc()),
        size=Window(Count("pk"), partition_by=partition),
    )
    wanted = Q()
    for point in points:
        below = (F("size") - 1) * point / 100 + 1  # integer division: the position at or below the rank
        wanted |= Q(position=below) | Q(position=below + 1)
    found: dict[tuple, dict[int, float]] = {}
    sizes: dict[tuple, int] = {}
    for *key, position, size, value in ranked.filter(wanted).values_list(*keys, "position", "size", column):
        found.setdefault(tuple(key), {})[position - 1] = value
        sizes[tuple(key)] = size
    return {
        key: {f"p{p}": _interpolate(values.__getitem__, sizes[key], p) for p in points}
        for key, values in found.items()
    }
