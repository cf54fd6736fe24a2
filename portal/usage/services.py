from __future__ import annotations

import logging
from datetime import UTC, datetime

import redis
from django.db import transaction
from django.utils import timezone

from engine_daemon import protocol
from engine_daemon.protocol import ProtocolError, UsageEvent
from portal.adapters.models import AdapterVersion
from portal.api_keys.models import TenantAPIKey
from portal.base_models.models import BaseModel
from portal.tenants.models import Tenant
from portal.usage.models import Usage

logger = logging.getLogger(__name__)


def usage_record(
    *,
    tenant: Tenant,
    request_id: str,
    model: str,
    status: str,
    created: datetime,
    total_time: float,
    api_key: TenantAPIKey | None = None,
    base_model: BaseModel | None = None,
    adapter_version: AdapterVersion | None = None,
    prompt_tokens: int = 0,
    cached_tokens: int = 0,
    completion_tokens: int = 0,
    time_to_first_token: float | None = None,
    error_code: str = "",
    stream: bool = False,
) -> Usage:
    """Record the portal's view of one request; idempotent by request id.

    When the engine's usage event was written first, its token counts stand (they are what it
    computed) and the portal adds what only it knows: the client's model name, timings, the outcome.
    """
    fields = dict(
        tenant=tenant,
        api_key=api_key,
        base_model=base_model,
        adapter_version=adapter_version,
        adapter=adapter_version.model_id if adapter_version else "",
        model=model[:200],
        status=Usage.Status(status),
        error_code=error_code[:50],
        time_to_first_token=time_to_first_token,
        total_time=max(0.0, total_time),
        stream=stream,
        created=created,
    )
    tokens = dict(prompt_tokens=max(0, prompt_tokens), completion_tokens=max(0, completion_tokens),
                  cached_tokens=max(0, cached_tokens))
    with transaction.atomic():
        usage, created_now = Usage.objects.select_for_update().get_or_create(
            request_id=request_id, defaults=fields | tokens
        )
        if not created_now and usage.engine_reported and not usage.portal_reported:
            for name, value in fields.items():
                setattr(usage, name, value)
            usage.portal_reported = True
            usage.save()
    return usage


_ENGINE_STATUS = {
    UsageEvent.DONE: Usage.Status.OK,
    UsageEvent.CANCELLED: Usage.Status.CANCELLED,
    UsageEvent.DEADLINE: Usage.Status.TIMEOUT,
    UsageEvent.ERROR: Usage.Status.ERROR,
}


def usage_record_from_engine(*, event: UsageEvent) -> Usage | None:
    """Record the engine's count of one request; idempotent by request id (a redelivered event changes nothing).

    A row the portal wrote first keeps its outcome and timings and takes the engine's token counts.
    A request whose portal died has no other row: this one stands alone. None: the tenant is gone.
    """
    tenant = Tenant.objects.filter(pk=_int_or_none(event.tenant_id)).first()
    if tenant is None:
        return None
    tokens = dict(prompt_tokens=max(0, event.prompt_tokens), completion_tokens=max(0, event.completion_tokens),
                  cached_tokens=max(0, event.cached_tokens), engine_reported=True)
    with transaction.atomic():
        usage = Usage.objects.select_for_update().filter(request_id=event.request_id).first()
        if usage is not None:
            if not usage.engine_reported:
                for name, value in tokens.items():
                    setattr(usage, name, value)
                usage.save(update_fields=list(tokens))
            return usage
        version = None
        if event.adapter_sha256:
            version = (AdapterVersion.objects.select_related("adapter")
                       .filter(adapter__tenant=tenant, sha256=event.adapter_sha256).order_by("-number").first())
        return Usage.objects.create(
            request_id=event.request_id,
            tenant=tenant,
            api_key=TenantAPIKey.objects.filter(pk=_int_or_none(event.key_id), tenant=tenant).first(),
            base_model=BaseModel.objects.filter(name=event.base_model).first(),
            adapter_version=version,
            adapter=version.model_id if version else (event.adapter or "")[:100],
            model=(event.adapter or event.base_model)[:200],
            status=_ENGINE_STATUS[event.end],
            error_code=event.error_code[:50],
            created=datetime.fromtimestamp(event.created, tz=UTC) if event.created else timezone.now(),
            portal_reported=False,
            **tokens,
        )


def usage_stream_drain(*, client: redis.Redis, consumer: str, batch: int = 500, max_entries: int = 20_000,
                       claim_idle_ms: int = 60_000) -> int:
    """Write what the engines reported on the usage stream, then delete it; returns the entries handled.

    One consumer group for all writers: each entry is written by one of them, acked and deleted only
    after its row is committed; a writer that died holding entries has them claimed after
    ``claim_idle_ms``. Idempotent rows make a redelivery harmless.
    """
    try:
        client.xgroup_create(protocol.USAGE_STREAM, protocol.USAGE_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    handled = 0
    _cursor, claimed, *_ = client.xautoclaim(protocol.USAGE_STREAM, protocol.USAGE_GROUP, consumer, claim_idle_ms,
                                             count=batch)
    entries = [e for e in claimed if e[1] is not None]
    while True:
        if not entries:
            reply = client.xreadgroup(protocol.USAGE_GROUP, consumer, {protocol.USAGE_STREAM: ">"}, count=batch)
            entries = [e for _stream, found in reply or [] for e in found]
        if not entries:
            return handled
        for _entry_id, fields in entries:
            try:
                usage_record_from_engine(event=UsageEvent.from_redis(fields))
            except ProtocolError as exc:  # a newer engine's event, or garbage: logged, and not retried forever
                logger.warning("dropping unreadable usage event: %s", exc)
        ids = [entry_id for entry_id, _fields in entries]
        pipe = client.pipeline(transaction=False)
        pipe.xack(protocol.USAGE_STREAM, protocol.USAGE_GROUP, *ids)
        pipe.xdel(protocol.USAGE_STREAM, *ids)
        pipe.execute()
        handled += len(ids)
        if handled >= max_entries:
            return handled
        entries = []


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
