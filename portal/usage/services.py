from __future__ import annotations

from datetime import datetime

from portal.adapters.models import AdapterVersion
from portal.api_keys.models import TenantAPIKey
from portal.base_models.models import BaseModel
from portal.tenants.models import Tenant
from portal.usage.models import Usage


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
    completion_tokens: int = 0,
    time_to_first_token: float | None = None,
    error_code: str = "",
    stream: bool = False,
) -> Usage:
    """Record one request. Recording the same request id twice keeps the first record (a retry is harmless)."""
    usage, _created = Usage.objects.get_or_create(
        request_id=request_id,
        defaults=dict(
            tenant=tenant,
            api_key=api_key,
            base_model=base_model,
            adapter_version=adapter_version,
            adapter=adapter_version.model_id if adapter_version else "",
            model=model[:200],
            status=Usage.Status(status),
            error_code=error_code[:50],
            prompt_tokens=max(0, prompt_tokens),
            completion_tokens=max(0, completion_tokens),
            time_to_first_token=time_to_first_token,
            total_time=max(0.0, total_time),
            stream=stream,
            created=created,
        ),
    )
    return usage
