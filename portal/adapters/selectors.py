"""Adapter reads, each scoped to one tenant: another tenant's adapter is not found, never forbidden."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, Max, OuterRef, QuerySet, Subquery, Sum

from portal.adapters.errors import AdapterRejected
from portal.adapters.models import Adapter, AdapterVersion
from portal.base_models.models import BaseModel
from portal.common.errors import NOT_FOUND, NOT_READY
from portal.tenants.models import Tenant

Status = AdapterVersion.Status


def adapter_list(*, tenant: Tenant) -> QuerySet[Adapter]:
    """The tenant's adapters, each with version_count, latest_number and latest_status annotated."""
    latest = AdapterVersion.objects.filter(adapter=OuterRef("pk")).order_by("-number")
    return (
        Adapter.objects.filter(tenant=tenant)
        .select_related("base_model", "default_version")
        .annotate(
            version_count=Count("versions"),
            latest_number=Max("versions__number"),
            latest_status=Subquery(latest.values("status")[:1]),
        )
        .order_by("name")
    )


def adapter_get(*, tenant: Tenant, name: str) -> Adapter:
    adapter = Adapter.objects.select_related("base_model", "default_version").filter(tenant=tenant, name=name).first()
    if adapter is None:
        raise AdapterRejected(f"no adapter {name!r} in this tenant", code=NOT_FOUND)
    return adapter


def adapter_version_list(*, adapter: Adapter) -> QuerySet[AdapterVersion]:
    return adapter.versions.select_related("uploaded_by", "uploaded_by_key").order_by("-number")


def adapter_version_get(*, tenant: Tenant, name: str, number: int) -> AdapterVersion:
    version = (
        AdapterVersion.objects.select_related("adapter__base_model", "adapter__default_version", "uploaded_by")
        .filter(adapter__tenant=tenant, adapter__name=name, number=number)
        .first()
    )
    if version is None:
        raise AdapterRejected(f"no version {number} of adapter {name!r} in this tenant", code=NOT_FOUND)
    return version


@dataclass(frozen=True)
class ResolvedModel:
    """What a request's ``model`` names: a base model, and the ready adapter version to apply, if any."""

    base_model: BaseModel
    version: AdapterVersion | None = None

    @property
    def adapter_sha256(self) -> str | None:
        """The adapter cache key for the engine (InferenceRequest.adapter_sha256); None = the base model alone."""
        return self.version.sha256 if self.version else None

    @property
    def adapter_name(self) -> str | None:
        """``name@N`` (InferenceRequest.adapter), also what usage should be recorded against."""
        return self.version.model_id if self.version else None

    @property
    def model_id(self) -> str:
        return self.adapter_name or self.base_model.name


def adapter_resolve_for_request(*, tenant: Tenant, model: str) -> ResolvedModel:
    """``name`` (the default version), ``name@N`` or a base model name → what to run.

    Raises AdapterRejected: code ``not_found`` for anything this tenant cannot see (including every
    other tenant's adapters), ``not_ready`` for the tenant's own version that is not ready yet.
    """
    name, at, number_text = model.partition("@")
    if at:
        version = (
            AdapterVersion.objects.select_related("adapter__base_model")
            .filter(adapter__tenant=tenant, adapter__name=name, number=_version_number(number_text, model))
            .first()
        )
        if version is None:
            raise _model_not_found(model)
        if version.status != Status.READY:
            raise AdapterRejected(
                f"{model} is {version.status}, not ready; wait until it is ready, or call {name!r} for the default version",
                code=NOT_READY,
            )
        return ResolvedModel(base_model=version.adapter.base_model, version=version)

    adapter = (
        Adapter.objects.select_related("base_model", "default_version__adapter").filter(tenant=tenant, name=model).first()
    )
    if adapter is not None:
        if adapter.default_version is None:
            raise AdapterRejected(
                f"adapter {model!r} has no ready version yet; wait for its upload to be validated", code=NOT_READY
            )
        return ResolvedModel(base_model=adapter.base_model, version=adapter.default_version)
    base = BaseModel.objects.filter(name=model, is_active=True).first()
    if base is not None:
        return ResolvedModel(base_model=base)
    raise _model_not_found(model)


def _version_number(text: str, model: str) -> int:
    if not text.isdigit():
        raise _model_not_found(model)
    return int(text)


def _model_not_found(model: str) -> AdapterRejected:
    return AdapterRejected(
        f"the model {model!r} does not exist; use one of your adapters ('name' or 'name@version') or a base model",
        code=NOT_FOUND,
    )


def model_ids_for_tenant(*, tenant: Tenant) -> list[str]:
    """Every ``model`` value this tenant may send: base models, adapters with a default, each ready name@N."""
    ids = list(BaseModel.objects.filter(is_active=True).order_by("name").values_list("name", flat=True))
    ids += list(
        Adapter.objects.filter(tenant=tenant, default_version__isnull=False).order_by("name").values_list("name", flat=True)
    )
    ready = AdapterVersion.objects.filter(adapter__tenant=tenant, status=Status.READY).order_by("adapter__name", "number")
    ids += [f"{name}@{number}" for name, number in ready.values_list("adapter__name", "number")]
    return ids


@dataclass(frozen=True)
class QuotaUse:
    """How much of one limit is used; ``limit`` None: no limit."""

    used: int
    limit: int | None

    def exceeded_by(self, more: int) -> bool:
        return self.limit is not None and self.used + more > self.limit


@dataclass(frozen=True)
class UploadQuota:
    """A tenant's upload quotas: bytes stored, adapters, and versions of ``adapter`` (0 used for a new one)."""

    storage_bytes: QuotaUse
    adapters: QuotaUse
    versions: QuotaUse


def tenant_upload_quota(*, tenant: Tenant, adapter: Adapter | None = None) -> UploadQuota:
    """What the tenant's uploads use of its quotas; its own limits (Tenant.max_*) beat the settings.

    A version counts, in bytes and towards its adapter's versions, while its files are kept: a rejected
    one stops counting once its files are deleted, LORAFLEET_REJECTED_RETENTION_SECONDS after.
    """
    kept = AdapterVersion.objects.filter(files_purged_at__isnull=True)
    stored = kept.filter(adapter__tenant=tenant).aggregate(total=Sum("size_bytes"))["total"] or 0
    return UploadQuota(
        storage_bytes=QuotaUse(stored, _limit(tenant.max_storage_bytes, settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES)),
        adapters=QuotaUse(
            Adapter.objects.filter(tenant=tenant).count(),
            _limit(tenant.max_adapters, settings.LORAFLEET_TENANT_MAX_ADAPTERS),
        ),
        versions=QuotaUse(
            kept.filter(adapter=adapter).count() if adapter is not None else 0,
            _limit(tenant.max_versions_per_adapter, settings.LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER),
        ),
    )


def _limit(own: int | None, setting: int) -> int | None:
    limit = setting if own is None else own
    return limit or None  # 0 means no limit
