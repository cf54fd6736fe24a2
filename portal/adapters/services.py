"""Adapter writes: create, upload a version, validate, stage, promote, delete.

A version's status only moves forward (pending → validating → ready | rejected), each move
under a row lock, so a redelivered task finds the work done and does nothing, or redoes only
what had not been recorded.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial

import kombu.exceptions
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone
from django.utils.text import get_valid_filename

from engine_daemon.peft_format import AdapterError
from engine_daemon.protocol import ControlEvent
from portal.adapters import staging
from portal.adapters.errors import AdapterRejected
from portal.adapters.models import Adapter, AdapterVersion, adapter_name_validator
from portal.adapters.uploads import AdapterUpload, upload_too_large_error
from portal.api_keys.models import TenantAPIKey
from portal.base_models.models import BaseModel
from portal.common.errors import CONFLICT, INVALID, NOT_FOUND, NOT_READY, UNAVAILABLE
from portal.tenants.models import Tenant

logger = logging.getLogger(__name__)
Status = AdapterVersion.Status


def adapter_create(
    *,
    tenant: Tenant,
    name: str,
    base_model: BaseModel,
    upload: AdapterUpload,
    description: str = "",
    uploaded_by: AbstractBaseUser | None = None,
    uploaded_by_key: TenantAPIKey | None = None,
    promote: bool = True,
) -> AdapterVersion:
    """A new adapter with its first version (validated in the background)."""
    try:
        adapter_name_validator(name)
    except ValidationError:
        raise AdapterRejected(
            f"adapter name {name!r} is not valid: use lowercase letters, digits, '-' and '_' "
            "(at most 64, starting and ending with a letter or digit)",
            code=INVALID,
        ) from None
    if BaseModel.objects.filter(name=name).exists():
        raise AdapterRejected(f"{name!r} is the name of a base model; choose another adapter name", code=CONFLICT)
    with transaction.atomic():
        if Adapter.objects.filter(tenant=tenant, name=name).exists():
            raise AdapterRejected(
                f"adapter {name!r} already exists; upload a new version with POST /api/v1/adapters/{name}/versions",
                code=CONFLICT,
            )
        try:
            with transaction.atomic():
                adapter = Adapter.objects.create(
                    tenant=tenant, name=name, description=description, base_model=base_model, created_by=uploaded_by
                )
        except IntegrityError:  # a concurrent create of the same name won
            raise AdapterRejected(f"adapter {name!r} already exists", code=CONFLICT) from None
        return adapter_version_create(
            adapter=adapter, upload=upload, uploaded_by=uploaded_by, uploaded_by_key=uploaded_by_key, promote=promote
        )


def adapter_version_create(
    *,
    adapter: Adapter,
    upload: AdapterUpload,
    uploaded_by: AbstractBaseUser | None = None,
    uploaded_by_key: TenantAPIKey | None = None,
    promote: bool = True,
) -> AdapterVersion:
    """Store the upload as the adapter's next version and enqueue its validation once committed."""
    if upload.size > settings.LORAFLEET_MAX_UPLOAD_BYTES:
        raise upload_too_large_error()
    stored: list[str] = []
    try:
        with transaction.atomic():
            adapter = Adapter.objects.select_for_update().get(pk=adapter.pk)  # numbers versions one at a time
            number = (adapter.versions.aggregate(top=Max("number"))["top"] or 0) + 1
            version = AdapterVersion(
                adapter=adapter,
                number=number,
                size_bytes=upload.size,
                promote_when_ready=promote,
                uploaded_by=uploaded_by,
                uploaded_by_key=uploaded_by_key,
            )
            for field, part in (
                ("archive", upload.archive),
                ("config_file", upload.adapter_config),
                ("weights_file", upload.adapter_model),
            ):
                if part is not None:
                    original = part.name or field
                    getattr(version, field).save(get_valid_filename(original) or field, part, save=False)
                    stored.append(getattr(version, field).name)
                    version.original_filenames[_PART_NAMES[field]] = original
            version.save()
            adapter.save(update_fields=["updated_at"])
            transaction.on_commit(partial(_enqueue_validation, version.pk))
    except BaseException:
        for name in stored:  # the row is gone with the transaction; so must its files be
            default_storage.delete(name)
        raise
    return version


_PART_NAMES = {"archive": "archive", "config_file": "adapter_config", "weights_file": "adapter_model"}


def _enqueue_validation(version_id: int) -> None:
    from portal.adapters.tasks import validate_adapter_version

    try:
        validate_adapter_version.delay(version_id)
    except kombu.exceptions.OperationalError as exc:  # the broker (Redis) is down: say so, leave nothing pending
        adapter_version_reject(
            version_id=version_id, reason="the upload could not be queued for validation (task queue unavailable)"
        )
        raise AdapterRejected(
            "the validation queue is unavailable, so the upload was not accepted; try again in a minute", code=UNAVAILABLE
        ) from exc


def _enqueue_staging(version_id: int) -> None:
    from portal.adapters.tasks import stage_adapter_version

    stage_adapter_version.delay(version_id)


def _locked_version(version_id: int) -> AdapterVersion | None:
    return AdapterVersion.objects.select_for_update().filter(pk=version_id).first()


def adapter_version_validate(*, version_id: int) -> AdapterVersion | None:
    """Check an upload; on success record sha256 + manifest and enqueue staging, else reject it."""
    with transaction.atomic():
        version = _locked_version(version_id)
        if version is None or version.status not in (Status.PENDING, Status.VALIDATING):
            return version  # deleted, or finished by an earlier delivery
        version.status = Status.VALIDATING
        version.save(update_fields=["status"])
    version = AdapterVersion.objects.select_related("adapter__base_model").filter(pk=version_id).first()
    if version is None:
        return None
    try:
        sha256, manifest = staging.upload_validate(version=version)
    except AdapterError as exc:
        return adapter_version_reject(version_id=version_id, reason=str(exc))
    with transaction.atomic():
        version = _locked_version(version_id)
        if version is None or version.status != Status.VALIDATING:
            staging.validated_dir_remove(version_id)
            return version
        version.sha256 = sha256
        version.manifest = manifest.to_dict()
        version.validated_at = timezone.now()
        version.save(update_fields=["sha256", "manifest", "validated_at"])
        transaction.on_commit(partial(_enqueue_staging, version_id))
    return version


def adapter_version_reject(*, version_id: int, reason: str) -> AdapterVersion | None:
    """Mark an unfinished version rejected with a reason for the uploader; a finished one stays as it is."""
    with transaction.atomic():
        version = _locked_version(version_id)
        if version is None or version.is_finished:
            return version
        version.status = Status.REJECTED
        version.error = reason
        version.rejected_at = timezone.now()
        version.save(update_fields=["status", "error", "rejected_at"])
    staging.validated_dir_remove(version_id)
    logger.info("adapter version %s rejected: %s", version_id, reason)
    return version


def adapter_version_stage(*, version_id: int) -> AdapterVersion | None:
    """Write the validated version into the adapter cache, mark it ready, tell the engines."""
    version = (
        AdapterVersion.objects.select_related("adapter__tenant", "adapter__base_model").filter(pk=version_id).first()
    )
    if version is None:
        return None
    if version.status == Status.READY:  # an earlier delivery committed; its event may not have gone out
        _publish_staged(version)
        return version
    if version.status != Status.VALIDATING or not version.sha256:
        return version
    try:
        with staging.cache_lock(version.sha256):
            staging.cache_dir_stage(version=version)
            with transaction.atomic():
                locked = _locked_version(version_id)
                if locked is None or locked.status != Status.VALIDATING:
                    return locked
                locked.status = Status.READY
                locked.ready_at = timezone.now()
                locked.save(update_fields=["status", "ready_at"])
                if locked.promote_when_ready:
                    _promote_if_newer(locked)
    except AdapterError as exc:
        return adapter_version_reject(version_id=version_id, reason=str(exc))
    staging.validated_dir_remove(version_id)
    _publish_staged(version)
    return version


def _promote_if_newer(version: AdapterVersion) -> None:
    """A newly ready upload becomes the default unless a later version already is (uploads can finish out of order)."""
    adapter = Adapter.objects.select_for_update().get(pk=version.adapter_id)
    current = adapter.default_version
    if current is None or current.number < version.number:
        adapter.default_version = version
        adapter.save(update_fields=["default_version", "updated_at"])


def _publish_staged(version: AdapterVersion) -> None:
    adapter = version.adapter
    staging.control_event_publish(
        ControlEvent(
            action=ControlEvent.ADAPTER_STAGED,
            sha256=version.sha256,
            adapter=version.model_id,
            tenant_id=str(adapter.tenant_id),
            base_model=adapter.base_model.name,
        )
    )


@transaction.atomic
def adapter_default_set(*, adapter: Adapter, number: int) -> Adapter:
    """Promote or roll back: the default version becomes ``number``, which must be ready."""
    adapter = Adapter.objects.select_for_update().get(pk=adapter.pk)
    version = adapter.versions.filter(number=number).first()
    if version is None:
        raise AdapterRejected(f"adapter {adapter.name!r} has no version {number}", code=NOT_FOUND)
    if version.status != Status.READY:
        raise AdapterRejected(
            f"{version.model_id} is {version.status}; only a ready version can be the default", code=NOT_READY
        )
    adapter.default_version = version
    adapter.save(update_fields=["default_version", "updated_at"])
    return adapter


def adapter_delete(*, adapter: Adapter) -> None:
    """Delete an adapter and its versions; their files leave storage, and the cache once unreferenced."""
    with transaction.atomic():
        adapter = Adapter.objects.select_for_update().select_related("tenant").get(pk=adapter.pk)
        versions = list(adapter.versions.all())
        purge = {
            "sha256s": sorted({v.sha256 for v in versions if v.sha256}),
            "storage_names": [f.name for v in versions for f in (v.archive, v.config_file, v.weights_file) if f],
            "version_ids": [v.pk for v in versions],
            "tenant_id": str(adapter.tenant_id),
            "adapter": adapter.name,
        }
        adapter.delete()
        transaction.on_commit(partial(_enqueue_purge, purge))


def _enqueue_purge(purge: dict) -> None:
    from portal.adapters.tasks import purge_adapter_files

    purge_adapter_files.delay(**purge)


def adapter_files_purge(
    *, sha256s: list[str], storage_names: list[str], version_ids: list[int], tenant_id: str, adapter: str
) -> list[str]:
    """Remove a deleted adapter's uploads, work directories and unreferenced cache entries.

    Returns the sha256s taken out of the cache; the engines hear of each with an adapter-deleted event.
    """
    for name in storage_names:
        default_storage.delete(name)
    for version_id in version_ids:
        staging.validated_dir_remove(version_id)
    removed = []
    for sha256 in sha256s:
        with staging.cache_lock(sha256):
            if AdapterVersion.objects.filter(sha256=sha256).exclude(status=Status.REJECTED).exists():
                continue  # another version (of any tenant) has the same content
            staging.cache_dir_remove(sha256)
        removed.append(sha256)
        staging.control_event_publish(
            ControlEvent(action=ControlEvent.ADAPTER_DELETED, sha256=sha256, adapter=adapter, tenant_id=tenant_id)
        )
    return removed


def adapter_versions_requeue(*, older_than: timedelta) -> list[int]:
    """Enqueue again the work of versions stuck unfinished (a lost message, a worker that never ran).

    Safe at any time: the tasks are idempotent. Returns the ids of the versions requeued.
    """
    cutoff = timezone.now() - older_than
    stuck = AdapterVersion.objects.filter(status__in=(Status.PENDING, Status.VALIDATING), created_at__lt=cutoff)
    requeued = []
    for version_id, sha256 in stuck.values_list("pk", "sha256"):
        (_enqueue_staging if sha256 else _enqueue_validation)(version_id)
        requeued.append(version_id)
    return requeued
