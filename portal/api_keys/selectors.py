from __future__ import annotations

from django.db.models import QuerySet

from portal.api_keys.errors import ApiKeyError
from portal.api_keys.models import TenantAPIKey
from portal.common.errors import NOT_FOUND
from portal.tenants.models import Tenant


def api_key_list(*, tenant: Tenant) -> QuerySet[TenantAPIKey]:
    return TenantAPIKey.objects.filter(tenant=tenant).select_related("created_by").order_by("revoked", "-created")


def api_key_get(*, tenant: Tenant, prefix: str) -> TenantAPIKey:
    key = TenantAPIKey.objects.filter(tenant=tenant, prefix=prefix).first()
    if key is None:
        raise ApiKeyError(f"no API key {prefix!r} in this tenant", code=NOT_FOUND)
    return key
