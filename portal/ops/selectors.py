"""What the ops dashboard shows, read from Redis (engine heartbeats, series, streams, the Celery list) and the database.

The engines publish their state in Redis (DESIGN.md, "Engine state"); the portal only reads it here.
Every Redis read of one refresh goes out in two pipelined round trips, on a client with short
timeouts: an unreachable Redis makes ``ops_overview`` say so within a second or two instead of
failing the page.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import F

from engine_daemon import protocol
from engine_daemon.protocol import Heartbeat, ProtocolError, prefix_hit_rate
from portal.adapters.models import AdapterVersion
from portal.base_models.models import BaseModel
from portal.tenants.models import Tenant

SERIES_SECONDS = protocol.SERIES_MAXLEN  # one sample a second
GONE_ENGINES_SECONDS = 3600  # engines that stopped beating this recently are listed as gone
STALE_BEAT_SECONDS = 2.5  # a live engine whose last beat is older than this is stuck in a long step
DEAD_LETTERS_SHOWN = 5
REJECTED_SHOWN = 8
TIER_ORDER = {"gpu": 0, "loading": 1, "host": 2, "disk": 3, "failed": 4}
SORT_KEYS = (
    "adapter", "tenant", "version", "tier", "last_used", "requests", "gpu_hits", "host_hits", "disk_loads",
    "slot_loads", "evictions", "mean_load_seconds", "engine",
)
# kombu's Redis transport keeps one list per priority step; without priorities only the first is used.
_CELERY_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")


@dataclass
class SeriesPoint:
    t: float
    tokens_per_second: float
    step_ms: float
    running: int
    waiting: int
    kv_used: float


@dataclass
class MemorySegment:
    kind: str  # weights | kv_cache | adapter_pool | other | free
    label: str
    bytes: int
    percent: float


@dataclass
class PrefixTenantRow:
    """One tenant's prompt tokens on one engine, and how many of them its prefix cache held."""

    tenant_id: str  # as the engine knows it: the tenant's primary key
    slug: str | None  # None: no such tenant in the database (gone, or another portal's)
    prompt_tokens: int
    cached_tokens: int

    @property
    def hit_percent(self) -> float | None:
        rate = prefix_hit_rate(self.prompt_tokens, self.cached_tokens)
        return None if rate is None else 100.0 * rate


@dataclass
class EngineView:
    beat: Heartbeat
    series: list[SeriesPoint]
    now: float
    prefix_tenants: list[PrefixTenantRow] = field(default_factory=list)  # the most prompt tokens first

    @property
    def engine_id(self) -> str:
        return self.beat.engine_id

    @property
    def uptime_seconds(self) -> float:
        return max(0.0, self.now - self.beat.started)

    @property
    def beat_age_seconds(self) -> float:
        return max(0.0, self.now - self.beat.updated)

    @property
    def is_stale(self) -> bool:
        return self.beat_age_seconds > STALE_BEAT_SECONDS

    @property
    def kv_percent(self) -> float:
        return 100.0 * self.beat.kv_blocks_used / self.beat.kv_blocks_total if self.beat.kv_blocks_total else 0.0

    @property
    def pool_percent(self) -> float:
        rows = self.beat.adapter_pool_rows
        return 100.0 * self.beat.adapter_pool_rows_used / rows if rows else 0.0

    @property
    def prefix_hit_percent(self) -> float | None:
        rate = self.beat.prefix_hit_rate
        return None if rate is None else 100.0 * rate

    @property
    def has_device_memory(self) -> bool:
        return not self.beat.device.startswith("cpu")

    @property
    def memory_total(self) -> int:
        return int(self.beat.memory.get("total", 0))

    @property
    def memory_segments(self) -> list[MemorySegment]:
        """weights / KV cache / adapter pool / other (the rest of the device: activations, other processes) / free."""
        memory = self.beat.memory
        total = self.memory_total
        known = [("weights", "weights"), ("kv_cache", "KV cache"), ("adapter_pool", "adapter pool")]
        parts = [(kind, label, int(memory.get(kind, 0))) for kind, label in known]
        free = int(memory.get("free", 0))
        other = total - sum(b for *_, b in parts) - free
        if other > 0:
            parts.append(("other", "other", other))
        if self.has_device_memory:  # on CPU the engine reports only what it allocated: there is no "free"
            parts.append(("free", "free", free))
        return [MemorySegment(kind, label, size, 100.0 * size / total if total else 0.0) for kind, label, size in parts]


@dataclass
class GoneEngine:
    engine_id: str
    last_seen: float


@dataclass
class AdapterOwner:
    """A tenant's adapter version whose content an engine's adapter row is, and whether staff pinned it."""

    tenant: str
    adapter: str
    version: int
    status: str
    version_id: int
    pinned: bool
    pinned_by: str | None  # who pinned it (None: not pinned, or that user is gone)
    pinned_at: datetime | None


@dataclass
class ResidencyRow:
    """One adapter as one engine holds it (the engine's own figures), and which tenant's version it is."""

    engine_id: str
    name: str  # the content sha256 of the staged version
    tier: str
    slot: int | None  # its first row in the engine's device pool
    in_host: bool
    requests: int
    gpu_hits: int
    host_hits: int
    disk_loads: int
    slot_loads: int
    evictions: int
    mean_load_seconds: float | None
    last_used: float | None
    error: str | None
    retry_at: float | None  # when the engine next tries a failed load (wall clock)
    pinned: bool  # the engine's own flag: it keeps the adapter on its device
    rank: int = 0  # rows it takes in the device pool
    device_bytes: int = 0  # of the pool, while it is there
    owners: list[AdapterOwner] = field(default_factory=list)

    @property
    def owner(self) -> AdapterOwner | None:
        return self.owners[0] if self.owners else None

    @property
    def portal_pins(self) -> list[AdapterOwner]:
        """The versions of this content staff pinned in the portal (each has an Unpin button)."""
        return [owner for owner in self.owners if owner.pinned]

    @property
    def pin_target(self) -> AdapterOwner | None:
        """The version a Pin button pins: the first ready one of this content (the engines pin the content)."""
        return next((owner for owner in self.owners if owner.status == AdapterVersion.Status.READY), None)

    @property
    def tier_label(self) -> str:
        if self.tier == "gpu":
            return f"GPU rows {self.slot}–{self.slot + self.rank - 1}" if self.rank > 1 else f"GPU row {self.slot}"
        return {"host": "host RAM", "disk": "disk only", "loading": "loading", "failed": "failed"}.get(self.tier, self.tier)

    def sort_value(self, key: str) -> Any:
        owner = self.owner
        if key == "adapter":
            return owner.adapter if owner else "~" + self.name  # unknown versions last
        if key == "tenant":
            return owner.tenant if owner else "~"
        if key == "version":
            return owner.version if owner else -1
        if key == "engine":
            return self.engine_id
        if key == "tier":
            return (TIER_ORDER.get(self.tier, 9), self.slot if self.slot is not None else 0)
        value = getattr(self, key)
        return value if value is not None else -1.0


@dataclass
class Consumer:
    name: str
    pending: int
    idle_seconds: float
    is_live: bool


@dataclass
class DeadLetter:
    entry_id: str
    at: float | None
    reason: str
    request_id: str
    tenant_id: str
    adapter: str
    engine_id: str


@dataclass
class QueueView:
    base_model: str
    length: int
    undelivered: int | None  # entries no consumer has read yet (None: the group does not exist yet)
    pending: int  # read by a consumer, not acknowledged yet
    consumers: list[Consumer]
    dead_letters: int
    latest_dead: list[DeadLetter]


@dataclass
class CeleryQueue:
    name: str
    length: int
    unacked: int  # taken by a worker, not finished yet


@dataclass
class OpsOverview:
    now: float
    redis_url: str
    redis_error: str | None = None
    engines: list[EngineView] = field(default_factory=list)
    gone_engines: list[GoneEngine] = field(default_factory=list)
    unreadable_engines: dict[str, str] = field(default_factory=dict)
    adapters: list[ResidencyRow] = field(default_factory=list)
    adapter_tenants: list[str] = field(default_factory=list)
    queues: list[QueueView] = field(default_factory=list)
    celery: CeleryQueue | None = None
    rejected: list[AdapterVersion] = field(default_factory=list)
    ready_not_on_engines: int = 0


@functools.lru_cache(maxsize=4)
def _ops_redis(url: str) -> redis.Redis:
    """A client that gives up fast: the dashboard reports an unreachable Redis, it does not hang on it."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2, retry=Retry(NoBackoff(), 0))


def redis_url_redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def ops_overview(*, tenant_slug: str | None = None, sort: str = "tier", now: float | None = None) -> OpsOverview:
    """Everything the dashboard shows, at one moment. Redis being down is a state of the answer, not an error."""
    now = time.time() if now is None else now
    overview = OpsOverview(now=now, redis_url=redis_url_redacted(settings.REDIS_URL))
    try:
        _read_redis(overview, _ops_redis(settings.REDIS_URL))
    except redis.RedisError as exc:
        overview.redis_error = str(exc) or exc.__class__.__name__
    prefix_tenants_attach(engines=overview.engines)
    rows = adapter_residency_list(engines=overview.engines)
    overview.adapter_tenants = sorted({o.tenant for row in rows for o in row.owners})
    overview.adapters = residency_filter_and_sort(rows, tenant_slug=tenant_slug, sort=sort)
    held = {row.name for row in rows}
    overview.ready_not_on_engines = (
        AdapterVersion.objects.filter(status=AdapterVersion.Status.READY).exclude(sha256__in=held).count()
    )
    overview.rejected = rejected_upload_list(limit=REJECTED_SHOWN)
    return overview


def _read_redis(overview: OpsOverview, client: redis.Redis) -> None:
    now = overview.now
    pipe = client.pipeline(transaction=False)
    pipe.zrange(protocol.ENGINES_KEY, 0, -1, withscores=True)
    pipe.hkeys(protocol.BASE_MODELS_KEY)
    queue = settings.CELERY_TASK_DEFAULT_QUEUE
    for suffix in _CELERY_PRIORITY_SUFFIXES:
        pipe.llen(queue + suffix)
    pipe.hlen("unacked")  # kombu's hash of messages delivered to a worker and not acked yet
    engines_listed, base_model_names, *celery_counts = pipe.execute()
    overview.celery = CeleryQueue(queue, sum(celery_counts[:-1]), celery_counts[-1])

    engine_ids = [_text(member) for member, _score in engines_listed]
    last_seen = {_text(member): score for member, score in engines_listed}
    base_models = {_text(name) for name in base_model_names}
    base_models |= set(BaseModel.objects.filter(is_active=True).values_list("name", flat=True))

    pipe = client.pipeline(transaction=False)
    series_start = f"{int((now - SERIES_SECONDS) * 1000)}"
    for engine_id in engine_ids:
        pipe.hgetall(protocol.heartbeat_key(engine_id))
        pipe.xrange(protocol.series_stream(engine_id), min=series_start, max="+")
    ordered_models = sorted(base_models)
    tenants_of = _tenants_with_streams(client, ordered_models)
    for name in ordered_models:
        for tenant in tenants_of[name]:
            stream = protocol.request_stream(name, tenant)
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
            pipe.xinfo_consumers(stream, protocol.CONSUMER_GROUP)
        pipe.xlen(protocol.dead_letter_stream(name))
        pipe.xrevrange(protocol.dead_letter_stream(name), count=DEAD_LETTERS_SHOWN)
    replies = iter(pipe.execute(raise_on_error=False))

    for engine_id in engine_ids:
        raw_beat, raw_series = next(replies), next(replies)
        _raise_connection_errors(raw_beat, raw_series)
        if not raw_beat:
            if now - last_seen[engine_id] < GONE_ENGINES_SECONDS:
                overview.gone_engines.append(GoneEngine(engine_id, last_seen[engine_id]))
            continue
        try:
            beat = Heartbeat.from_redis(raw_beat)
        except ProtocolError as exc:
            overview.unreadable_engines[engine_id] = str(exc)
            continue
        series = [] if isinstance(raw_series, Exception) else _series_points(raw_series)
        overview.engines.append(EngineView(beat, series, now))
    overview.gone_engines.sort(key=lambda gone: -gone.last_seen)

    live_consumers = {view.engine_id for view in overview.engines}
    for name in ordered_models:
        queue = QueueView(base_model=name, length=0, undelivered=None, pending=0, consumers=[], dead_letters=0,
                          latest_dead=[])
        for tenant in tenants_of[name]:
            length, groups, consumers = (next(replies) for _ in range(3))
            _raise_connection_errors(length, groups, consumers)
            _add_tenant_stream(queue, client, protocol.request_stream(name, tenant), length, groups, consumers,
                               live_consumers)
        dead_count, dead = next(replies), next(replies)
        _raise_connection_errors(dead_count, dead)
        queue.dead_letters = 0 if isinstance(dead_count, Exception) else int(dead_count)
        queue.latest_dead = [] if isinstance(dead, Exception) else [_dead_letter(i, fields) for i, fields in dead]
        queue.consumers.sort(key=lambda c: c.name)
        overview.queues.append(queue)


def _tenants_with_streams(client: redis.Redis, base_models: list[str]) -> dict[str, list[str]]:
    """Each base model's tenants that have a request stream (the engines' own index of them)."""
    pipe = client.pipeline(transaction=False)
    for name in base_models:
        pipe.hkeys(protocol.tenant_index(name))
    return {name: sorted(_text(t) for t in tenants) for name, tenants in zip(base_models, pipe.execute(), strict=True)}


def _add_tenant_stream(queue: QueueView, client: redis.Redis, stream: str, length: Any, groups: Any, consumers: Any,
                       live: set[str]) -> None:
    """One tenant's request stream, added into its base model's queue: lengths summed, consumers merged."""
    queue.length += 0 if isinstance(length, Exception) else int(length)
    group = None
    if not isinstance(groups, Exception):
        group = next((g for g in groups if _text(g["name"]) == protocol.CONSUMER_GROUP), None)
    if group is not None:
        queue.pending += int(group["pending"])
        undelivered = group.get("lag")
        if undelivered is None:  # Redis < 7, or a lag Redis cannot tell after deletions: count them
            last = _text(group["last-delivered-id"])
            undelivered = len(client.xrange(stream, min=f"({last}", max="+", count=10000))
        queue.undelivered = (queue.undelivered or 0) + int(undelivered)
    if isinstance(consumers, Exception):
        return
    known = {c.name: c for c in queue.consumers}
    for raw in consumers:
        name, pending, idle = _text(raw["name"]), int(raw["pending"]), int(raw["idle"]) / 1000
        if name in known:
            known[name].pending += pending
            known[name].idle_seconds = min(known[name].idle_seconds, idle)
        else:
            known[name] = Consumer(name, pending, idle, name in live)
            queue.consumers.append(known[name])



def _dead_letter(entry_id: Any, raw: dict[Any, Any]) -> DeadLetter:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    try:
        body = json.loads(fields.get("body", ""))
        body = body if isinstance(body, dict) else {}
    except ValueError:
        body = {}
    at = fields.get("at")
    return DeadLetter(
        entry_id=_text(entry_id),
        at=float(at) if at else None,
        reason=fields.get("reason", ""),
        request_id=str(body.get("request_id") or ""),
        tenant_id=str(body.get("tenant_id") or ""),
        adapter=str(body.get("adapter") or ""),
        engine_id=fields.get("engine_id", ""),
    )


def _series_points(entries: list[tuple[Any, dict[Any, Any]]]) -> list[SeriesPoint]:
    points = []
    for _entry_id, raw in entries:
        fields = {_text(k): _text(v) for k, v in raw.items()}
        try:
            points.append(SeriesPoint(
                t=float(fields["t"]),
                tokens_per_second=float(fields["tokens_per_second"]),
                step_ms=float(fields["step_ms"]),
                running=int(fields["running"]),
                waiting=int(fields["waiting"]),
                kv_used=float(fields["kv_used"]),
            ))
        except (KeyError, ValueError):
            continue  # a sample this portal cannot read is left out of the chart, not the page
    return points


def adapter_residency_list(*, engines: list[EngineView]) -> list[ResidencyRow]:
    """Every adapter each engine holds, with the tenant, adapter and version its content hash belongs to, and
    which of those versions staff pinned."""
    rows = [
        ResidencyRow(
            engine_id=view.engine_id,
            name=str(a["name"]),
            tier=str(a.get("tier", "")),
            slot=a.get("slot"),
            in_host=bool(a.get("in_host")),
            requests=int(a.get("requests", 0)),
            gpu_hits=int(a.get("gpu_hits", 0)),
            host_hits=int(a.get("host_hits", 0)),
            disk_loads=int(a.get("disk_loads", 0)),
            slot_loads=int(a.get("slot_loads", 0)),
            evictions=int(a.get("evictions", 0)),
            mean_load_seconds=a.get("mean_load_seconds"),
            last_used=a.get("last_used"),
            error=a.get("error"),
            retry_at=a.get("retry_at"),
            pinned=bool(a.get("pinned")),
            rank=int(a.get("rank", 0)),
            device_bytes=int(a.get("device_bytes", 0)),
        )
        for view in engines
        for a in view.beat.adapters
    ]
    owners: dict[str, list[AdapterOwner]] = {}
    versions = (
        AdapterVersion.objects.filter(sha256__in={row.name for row in rows})
        .annotate(tenant_slug=F("adapter__tenant__slug"), adapter_name=F("adapter__name"),
                  pinned_by_name=F(f"pinned_by__{get_user_model().USERNAME_FIELD}"))
        .order_by("adapter__tenant__slug", "adapter__name", "number")
        .values_list("sha256", "tenant_slug", "adapter_name", "number", "status", "pk", "pinned", "pinned_by_name",
                     "pinned_at")
    )
    for sha256, tenant, adapter, number, status, pk, pinned, pinned_by, pinned_at in versions:
        owners.setdefault(sha256, []).append(  # identical uploads share one cache entry
            AdapterOwner(tenant, adapter, number, status, version_id=pk, pinned=pinned, pinned_by=pinned_by,
                         pinned_at=pinned_at)
        )
    for row in rows:
        row.owners = owners.get(row.name, [])
    return rows


def prefix_tenants_attach(*, engines: list[EngineView]) -> None:
    """Each engine's per-tenant prefix cache figures as rows named by tenant slug (one query for all engines)."""
    ids = {tenant_id for view in engines for tenant_id in view.beat.prefix_tenants}
    slugs = {str(pk): slug for pk, slug in
             Tenant.objects.filter(pk__in=[int(i) for i in ids if i.isdigit()]).values_list("pk", "slug")}
    for view in engines:
        rows = [PrefixTenantRow(tenant_id, slugs.get(tenant_id), int(prompt), int(cached))
                for tenant_id, (prompt, cached) in view.beat.prefix_tenants.items()]
        view.prefix_tenants = sorted(rows, key=lambda row: (-row.prompt_tokens, row.tenant_id))


def residency_filter_and_sort(rows: list[ResidencyRow], *, tenant_slug: str | None, sort: str) -> list[ResidencyRow]:
    """``sort`` is a key of SORT_KEYS, ``-`` first for descending; tier sorts the device pool's adapters first
    (by row), then by last use."""
    if tenant_slug:
        rows = [row for row in rows if any(o.tenant == tenant_slug for o in row.owners)]
    descending = sort.startswith("-")
    key = sort.lstrip("-")
    if key not in SORT_KEYS:
        key, descending = "tier", False
    rows = sorted(rows, key=lambda row: -(row.last_used or 0))
    return sorted(rows, key=lambda row: row.sort_value(key), reverse=descending)


def pinned_twin_labels(*, version: AdapterVersion) -> list[str]:
    """The other pinned versions of the same content, as tenant/name@N: while one is, the engines keep it pinned."""
    if not version.sha256:
        return []
    twins = (
        AdapterVersion.objects.filter(sha256=version.sha256, pinned=True)
        .exclude(pk=version.pk)
        .select_related("adapter__tenant")
        .order_by("adapter__tenant__slug", "adapter__name", "number")
    )
    return [f"{twin.adapter.tenant.slug}/{twin.model_id}" for twin in twins]


def rejected_upload_list(*, limit: int) -> list[AdapterVersion]:
    return list(
        AdapterVersion.objects.filter(status=AdapterVersion.Status.REJECTED)
        .select_related("adapter__tenant")
        .order_by("-created_at", "-pk")[:limit]
    )


def _raise_connection_errors(*replies: Any) -> None:
    """A pipeline returns errors in place; a lost connection fails the whole read, a missing key does not."""
    for reply in replies:
        if isinstance(reply, redis.ConnectionError | redis.TimeoutError):
            raise reply


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes | bytearray) else str(value)

