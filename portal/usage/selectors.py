"""Usage reads, scoped to one tenant. Percentiles are computed here in Python, the same on every database."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from django.db.models import QuerySet

from portal.common.errors import INVALID
from portal.tenants.models import Tenant
from portal.usage.errors import UsageError
from portal.usage.models import Usage

GROUPINGS = ("adapter", "key", "day")
PERCENTILES = (50, 95, 99)


@dataclass
class UsageGroup:
    """The requests of one adapter, key or day. Latency percentiles cover the requests that ended ``ok``."""

    group: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    time_to_first_token: dict[str, float | None] = field(default_factory=dict)
    total_time: dict[str, float | None] = field(default_factory=dict)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def usage_list(*, tenant: Tenant, since: datetime | None = None, until: datetime | None = None) -> QuerySet[Usage]:
    """The tenant's records with ``since <= created < until``, newest first."""
    records = Usage.objects.filter(tenant=tenant)
    if since is not None:
        records = records.filter(created__gte=since)
    if until is not None:
        records = records.filter(created__lt=until)
    return records.order_by("-created")


def usage_summary(
    *, tenant: Tenant, since: datetime | None = None, until: datetime | None = None, group_by: str = "adapter"
) -> list[UsageGroup]:
    """Requests, tokens, outcomes and p50/p95/p99 latencies per adapter (``name@N``, or the base model's
    name), per API key (its prefix; ``-`` for none) or per UTC day (``YYYY-MM-DD``), sorted by group."""
    if group_by not in GROUPINGS:
        raise UsageError(f"group_by must be one of {list(GROUPINGS)}, got {group_by!r}", code=INVALID)
    if since is not None and until is not None and since >= until:
        raise UsageError("since must be before until", code=INVALID)
    rows = usage_list(tenant=tenant, since=since, until=until).values_list(
        "adapter", "model", "base_model__name", "api_key__prefix", "created",
        "status", "prompt_tokens", "completion_tokens", "time_to_first_token", "total_time",
    )
    groups: dict[str, UsageGroup] = {}
    statuses: dict[str, Counter] = {}
    ttfts: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {}
    for adapter, model, base_name, key_prefix, created, status, prompt, completion, ttft, total in rows.iterator():
        if group_by == "adapter":
            label = adapter or base_name or model
        elif group_by == "key":
            label = key_prefix or "-"
        else:
            label = created.date().isoformat()  # USE_TZ: created is in UTC
        group = groups.setdefault(label, UsageGroup(label))
        group.requests += 1
        group.prompt_tokens += prompt
        group.completion_tokens += completion
        statuses.setdefault(label, Counter())[status] += 1
        if status == Usage.Status.OK:
            if ttft is not None:
                ttfts.setdefault(label, []).append(ttft)
            totals.setdefault(label, []).append(total)
    for label, group in groups.items():
        group.statuses = dict(sorted(statuses[label].items()))
        group.time_to_first_token = percentiles(ttfts.get(label, []))
        group.total_time = percentiles(totals.get(label, []))
    return [groups[label] for label in sorted(groups)]


def percentiles(values: list[float], points: tuple[int, ...] = PERCENTILES) -> dict[str, float | None]:
    """``{"p50": .., "p95": .., "p99": ..}`` by linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    return {f"p{p}": _interpolate(ordered, p) for p in points}


def _interpolate(ordered: list[float], point: float) -> float | None:
    if not ordered:
        return None
    rank = (len(ordered) - 1) * point / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
