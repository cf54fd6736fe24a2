from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from portal.adapters.models import Adapter, AdapterVersion
from portal.base_models.models import BaseModel
from portal.tenants.models import Tenant

BASE_MODEL_OWNER = "lorafleet"


@dataclass(frozen=True)
class ModelEntry:
    """One ``model`` a tenant may call, as ``GET /v1/models`` lists it."""

    id: str
    created: int  # unix seconds: registration of a base model, readiness of an adapter version
    owned_by: str  # "lorafleet" for a base model, the tenant's slug for its adapters


def model_list_for_tenant(*, tenant: Tenant) -> list[ModelEntry]:
    """The ids of ``adapters.selectors.model_ids_for_tenant``, in its order, with when and whose."""
    entries = [
        ModelEntry(base.name, _unix(base.registered_at), BASE_MODEL_OWNER)
        for base in BaseModel.objects.filter(is_active=True).order_by("name")
    ]
    adapters = (
        Adapter.objects.filter(tenant=tenant, default_version__isnull=False)
        .select_related("default_version")
        .order_by("name")
    )
    entries += [ModelEntry(a.name, _unix(a.default_version.ready_at or a.created_at), tenant.slug) for a in adapters]
    ready = (
        AdapterVersion.objects.filter(adapter__tenant=tenant, status=AdapterVersion.Status.READY)
        .select_related("adapter")
        .order_by("adapter__name", "number")
    )
    entries += [ModelEntry(v.model_id, _unix(v.ready_at or v.created_at), tenant.slug) for v in ready]
    return entries


def _unix(moment: datetime) -> int:
    return int(moment.timestamp())
