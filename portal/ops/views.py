"""The staff dashboard (/ops/) with its live fragment and Pin buttons, the tenants' usage page, and the portal's
/metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from portal.adapters.models import AdapterVersion
from portal.adapters.services import adapter_version_pin_set
from portal.common.access import access_for_request
from portal.common.errors import FORBIDDEN, INVALID, NOT_FOUND
from portal.ops.charts import Chart, line_chart, recent_ticks
from portal.ops.errors import OpsError
from portal.ops.forms import AdapterPinForm, UsagePeriodForm
from portal.ops.selectors import SERIES_SECONDS, EngineView, ops_overview, pinned_twin_labels
from portal.usage.selectors import UsageReport, usage_report

LIVE_INTERVAL_MS = 1500
USAGE_GROUPS_PER_PAGE = 50
MIN_CHART_SECONDS = 60
# (sort key, header, numeric: the first click sorts descending)
RESIDENCY_COLUMNS = (
    ("adapter", "Adapter", False), ("tenant", "Tenant", False), ("version", "Version", True),
    ("tier", "Tier", False), ("last_used", "Last used", True), ("requests", "Requests", True),
    ("gpu_hits", "GPU hits", True), ("host_hits", "Host hits", True), ("disk_loads", "Disk loads", True),
    ("slot_loads", "Slot loads", True), ("evictions", "Evictions", True), ("mean_load_seconds", "Mean load", True),
)


def require_staff(request: HttpRequest) -> None:
    if not request.user.is_staff:
        raise OpsError("the operations dashboard is for staff; ask an administrator for the staff flag", code=FORBIDDEN)


@require_GET
@login_required
def ops_dashboard_view(request: HttpRequest) -> HttpResponse:
    require_staff(request)
    return render(request, "ops/dashboard.html", _live_context(request))


@never_cache
@require_GET
@login_required
def ops_live_view(request: HttpRequest) -> HttpResponse:
    """The part of the dashboard that changes: the page swaps it in place."""
    require_staff(request)
    return render(request, "ops/_live.html", _live_context(request))


def _live_context(request: HttpRequest) -> dict[str, Any]:
    tenant = request.GET.get("tenant", "").strip()
    sort = request.GET.get("sort", "tier").strip() or "tier"
    overview = ops_overview(tenant_slug=tenant or None, sort=sort)
    return {
        "overview": overview,
        "engines": [(view, engine_charts(view)) for view in overview.engines],
        "columns": _sort_columns(request.GET, sort),
        "tenant": tenant,
        "multiple_engines": len({row.engine_id for row in overview.adapters}) > 1 or len(overview.engines) > 1,
        "live_interval_ms": LIVE_INTERVAL_MS,
        # The Pin buttons post with the page's query string, so the redirect comes back to the same view of it.
        "query": request.GET.urlencode(),
    }


@require_POST
@login_required
def ops_adapter_pin_view(request: HttpRequest, version_id: int) -> HttpResponse:
    """Pin an adapter version on the engines' devices, or unpin it; then back to the dashboard as it was."""
    require_staff(request)
    form = AdapterPinForm(request.POST)
    if not form.is_valid():
        raise OpsError("send pinned=1 to pin the version, or pinned=0 to unpin it", code=INVALID)
    version = AdapterVersion.objects.select_related("adapter__tenant").filter(pk=version_id).first()
    if version is None:
        raise OpsError(f"no adapter version {version_id}: it was deleted; reload the dashboard", code=NOT_FOUND)
    pinned = form.cleaned_data["pinned"]
    adapter_version_pin_set(version=version, pinned=pinned, by=request.user)
    where = f"{version.adapter.tenant.slug}/{version.model_id}"
    if pinned:
        messages.success(request, f"Pinned {where}: every engine keeps it on its device once loaded.")
    elif twins := pinned_twin_labels(version=version):
        messages.success(request, f"Unpinned {where}; its content stays pinned on the engines for the identical "
                                  f"upload {', '.join(twins)}: unpin that too to let the engines evict it.")
    else:
        messages.success(request, f"Unpinned {where}: the engines may evict it again.")
    return HttpResponseRedirect(_dashboard_url(request.GET))


def _dashboard_url(query: QueryDict) -> str:
    return reverse("ops:dashboard") + (f"?{query.urlencode()}" if query else "") + "#residency"


def engine_charts(view: EngineView) -> list[Chart]:
    """Tokens/s and step time over the last 15 minutes, or since the engine started if that is more recent."""
    now = view.now
    first = min([view.beat.started] + [p.t for p in view.series])
    seconds = min(SERIES_SECONDS, max(MIN_CHART_SECONDS, now - first))
    window = (now - seconds, now)
    subtitle = f"last {seconds / 60:.0f} min" if seconds >= 120 else f"last {seconds:.0f} s"
    ticks = recent_ticks(now, seconds)
    tokens = [(p.t, p.tokens_per_second) for p in view.series]
    step = [(p.t, p.step_ms) for p in view.series]
    common: dict[str, Any] = {"x_range": window, "x_ticks": ticks, "max_gap": 5, "subtitle": subtitle}
    return [
        line_chart(title="Tokens/s", series={"tokens/s": tokens}, **common),
        line_chart(title="Step time", series={"ms": step}, unit="ms", **common),
    ]


def _sort_columns(query: QueryDict, sort: str) -> list[dict[str, Any]]:
    current = sort.lstrip("-")
    columns = []
    for key, label, numeric in RESIDENCY_COLUMNS:
        if key == current:
            next_sort = key if sort.startswith("-") else f"-{key}"
            direction = "descending" if sort.startswith("-") else "ascending"
        else:
            next_sort, direction = (f"-{key}" if numeric else key), ""
        params = query.copy()
        params["sort"] = next_sort
        columns.append(
            {"key": key, "label": label, "href": "?" + params.urlencode(), "direction": direction, "numeric": numeric}
        )
    return columns


@require_GET
@login_required
def usage_view(request: HttpRequest) -> HttpResponse:
    """The active tenant's requests, tokens and latencies per adapter or per API key over a period; the table
    of groups a page at a time."""
    access = access_for_request(request)
    form = UsagePeriodForm(request.GET)
    context: dict[str, Any] = {"form": form, "tenant": access.tenant}
    if not form.is_valid():
        return render(request, "ops/usage.html", context, status=400)
    since, until = form.period_range(timezone.now())
    report = usage_report(tenant=access.tenant, since=since, until=until, group_by=form.cleaned_data["group"])
    page_query = request.GET.copy()
    page_query.pop("page", None)
    context.update(
        report=report, charts=usage_charts(report), last_day=until - timedelta(seconds=1),
        page=Paginator(report.summary, USAGE_GROUPS_PER_PAGE).get_page(request.GET.get("page")),
        page_query=page_query.urlencode(),
    )
    return render(request, "ops/usage.html", context)


def usage_charts(report: UsageReport) -> list[Chart]:
    x_range = (report.since.timestamp(), report.until.timestamp())
    half = report.bucket.total_seconds() / 2
    centers = [start.timestamp() + half for start in report.bucket_starts]
    ticks = calendar_ticks(report.since, report.until)
    per = "hour" if report.bucket == timedelta(hours=1) else "day"

    def label(group: str) -> str:
        name = report.key_names.get(group)
        return f"{name} ({group})" if name else group

    def chart(title: str, field: str, **options: Any) -> Chart:
        series = {label(s.group): list(zip(centers, getattr(s, field), strict=True)) for s in report.series}
        return line_chart(title=title, series=series, x_range=x_range, x_ticks=ticks, show_latest=False, **options)

    seconds = {"unit": "s"}
    return [
        chart(f"Requests per {per}", "requests"),
        chart(f"Tokens per {per} (prompt + completion)", "tokens"),
        chart("Latency p50 in seconds, arrival to last byte", "total_time_p50", **seconds),
        chart("Latency p95 in seconds, arrival to last byte", "total_time_p95", **seconds),
    ]


def calendar_ticks(since: datetime, until: datetime, most: int = 8) -> list[tuple[float, str]]:
    """Ticks on whole hours or days (UTC), at most ``most`` of them."""
    span = until - since
    steps = [timedelta(hours=h) for h in (1, 2, 3, 6, 12)] + [timedelta(days=d) for d in (1, 2, 7, 14, 30, 61)]
    step = next((s for s in steps if span / s <= most), steps[-1])
    tick = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if step >= timedelta(days=1):
        tick = tick.replace(hour=0)
    while tick < since:
        tick += step
    ticks = []
    while tick <= until:
        daily = step >= timedelta(days=1) or (tick.hour == 0 and span > timedelta(hours=24))
        ticks.append((tick.timestamp(), tick.strftime("%b %d") if daily else tick.strftime("%H:%M")))
        tick += step
    return ticks


def portal_metrics_view(request: HttpRequest) -> HttpResponse:
    """django-prometheus's exposition, unauthenticated for scrapers (see LORAFLEET_PORTAL_METRICS in settings)."""
    if not settings.LORAFLEET_PORTAL_METRICS:
        raise Http404("metrics are turned off (LORAFLEET_PORTAL_METRICS=0)")
    from django_prometheus.exports import ExportToDjangoView

    return ExportToDjangoView(request)
