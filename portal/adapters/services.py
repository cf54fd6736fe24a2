"""Adapter writes: create, upload a version, validate, stage, promote, pin (and resync the pins), delete.

A version's status only moves forward (pending → validating → ready | rejected), each move
under a row lock, so a redelivered task finds the work done and does nothing, or redoes only
what had not been recorded.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial

import kombu.exceptions
import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.core.files.storage import default_storage
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F, Max
from django.utils import timezone
from django.utils.text import get_valid_filename

from engine_daemon.peft_format import AdapterError
from engine_daemon.protocol import PINNED_ADAPTERS_KEY, ControlEvent
from portal.adapters import staging
from portal.adapters.errors import AdapterRejected
from portal.adapters.models import Adapter, AdapterVersion, adapter_name_validator
from portal.adapters.selectors import tenant_upload_quota
from portal.adapters.uploads import AdapterUpload, upload_too_large_error
from portal.api_keys.models import TenantAPIKey
from portal.base_models.models import BaseModel
from portal.common.errors import (
    CONFLICT,
    FORBIDDEN,
    INVALID,
    NOT_FOUND,
    NOT_READY,
    QUOTA_EXCEEDED,
    UNAVAILABLE,
)
from portal.tenants.models import Membership, Tenant, role_at_least

logger = logging.getLogger(__name__)
Status = AdapterVersion.Status
Role = Membership.Role


def adapter_promote_allowed(*, role: str, adapter: Adapter | None) -> bool:
    """Whether someone of ``role`` may make an upload the default version of ``adapter``.

    Owners and admins may (an API key acts as an admin). A member may not move a default, by upload
    or by hand, except with the first version of a new adapter (``adapter=None``): there is no
    default to move yet, and without one the adapter cannot be called by its name.
    """
    return adapter is None or role_at_least(role, Role.ADMIN)


def adapter_upload_promote(*, role: str, adapter: Adapter | None, promote: bool | None) -> bool:
    """Whether an upload becomes the default once ready: ``promote`` when sent, else whether ``role`` may.

    A member who asks to move an existing adapter's default is refused (forbidden), naming the role.
    """
    allowed = adapter_promote_allowed(role=role, adapter=adapter)
    if promote and not allowed:
        raise AdapterRejected(
            f"moving the default version needs the admin role in tenant {adapter.tenant.slug}; you are {role}: "
            "upload without promote, and ask an admin to promote it",
            code=FORBIDDEN,
        )
    return allowed if promote is None else promote


def adapter_create(
    *,
    tenant: Tenant,
    name: str,
    base_model: BaseModel,
    upload: AdapterUpload,
    description: str = "",
    uploaded_by: AbstractBaseUser | None = None,
    uploaded_by_key: TenantAPIKey | None = None,
    role: str = Role.ADMIN,
    promote: bool | None = None,
) -> AdapterVersion:
    """A new adapter with its first version (validated in the background).

    ``role`` is the uploader's in the tenant (API keys act as admins; the default is for code acting
    for the operator). Even a member's first version becomes the default once ready, unless
    ``promote`` is False: there is no default to move yet (``adapter_promote_allowed``).
    """
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
    _upload_size_check(upload)
    promote = adapter_upload_promote(role=role, adapter=None, promote=promote)
    with transaction.atomic():
        tenant = _locked_tenant(tenant.pk)
        if Adapter.objects.filter(tenant=tenant, name=name).exists():
            raise AdapterRejected(
                f"adapter {name!r} already exists; upload a new version with POST /api/v1/adapters/{name}/versions",
                code=CONFLICT,
            )
        _adapter_quota_check(tenant=tenant)
        try:
            with transaction.atomic():
                adapter = Adapter.objects.create(
                    tenant=tenant, name=name, description=description, base_model=base_model, created_by=uploaded_by
                )
        except IntegrityError:  # a concurrent create of the same name won
            raise AdapterRejected(f"adapter {name!r} already exists", code=CONFLICT) from None
        return _version_store(
            adapter=adapter, upload=upload, uploaded_by=uploaded_by, uploaded_by_key=uploaded_by_key, promote=promote
        )


def adapter_version_create(
    *,
    adapter: Adapter,
    upload: AdapterUpload,
    uploaded_by: AbstractBaseUser | None = None,
    uploaded_by_key: TenantAPIKey | None = None,
    role: str = Role.ADMIN,
    promote: bool | None = None,
) -> AdapterVersion:
    """Store the upload as the adapter's next version and enqueue its validation once committed.

    ``promote`` not sent: the version becomes the default once ready if ``role`` may move it (owners,
    admins); a member's does not, and a member who sends ``promote=True`` is refused.
    """
    _upload_size_check(upload)
    promote = adapter_upload_promote(role=role, adapter=adapter, promote=promote)
    return _version_store(
        adapter=adapter, upload=upload, uploaded_by=uploaded_by, uploaded_by_key=uploaded_by_key, promote=promote
    )


def _upload_size_check(upload: AdapterUpload) -> None:
    if upload.size > settings.LORAFLEET_MAX_UPLOAD_BYTES:
        raise upload_too_large_error()


def _locked_tenant(tenant_id: int) -> Tenant:
    """The tenant's row, locked: its uploads are counted against its quotas one at a time."""
    return Tenant.objects.select_for_update().get(pk=tenant_id)


def _adapter_quota_check(*, tenant: Tenant) -> None:
    """Refuse a new adapter past the tenant's adapter quota; the caller holds the tenant's row lock."""
    adapters = tenant_upload_quota(tenant=tenant).adapters
    if adapters.exceeded_by(1):
        raise AdapterRejected(
            f"tenant {tenant.slug} has {adapters.used} of {adapters.limit} adapters, its adapter quota: "
            "delete adapters you no longer need, or ask the operator to raise it",
            code=QUOTA_EXCEEDED,
        )


def _version_quota_check(*, tenant: Tenant, adapter: Adapter, size: int) -> None:
    """Refuse a version of ``size`` bytes past the version or storage quota; the caller holds the row locks."""
    quota = tenant_upload_quota(tenant=tenant, adapter=adapter)
    if quota.versions.exceeded_by(1):
        raise AdapterRejected(
            f"adapter {adapter.name!r} has {quota.versions.used} of {quota.versions.limit} versions, the quota per "
            f"adapter in tenant {tenant.slug}: upload this one as a new adapter, or ask the operator to raise it",
            code=QUOTA_EXCEEDED,
        )
    storage = quota.storage_bytes
    if storage.exceeded_by(size):
        raise AdapterRejected(
            f"tenant {tenant.slug} stores {_size_label(storage.used)} of {_size_label(storage.limit)}; this upload of "
            f"{_size_label(size)} would pass the storage quota: delete adapters you no longer need, "
            "or ask the operator to raise it",
            code=QUOTA_EXCEEDED,
        )


def _size_label(size: int) -> str:
    """1536 → '1.5 KiB': a size in a message, readable at any scale."""
    value, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"


def _version_store(
    *,
    adapter: Adapter,
    upload: AdapterUpload,
    uploaded_by: AbstractBaseUser | None,
    uploaded_by_key: TenantAPIKey | None,
    promote: bool,
) -> AdapterVersion:
    """Check the quotas, then save the upload's files and row as the adapter's next version."""
    stored: list[str] = []
    try:
        with transaction.atomic():
            tenant = _locked_tenant(adapter.tenant_id)
            adapter = Adapter.objects.select_for_update().get(pk=adapter.pk)  # numbers versions one at a time
            _version_quota_check(tenant=tenant, adapter=adapter, size=upload.size)
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


MAX_LOST_VALIDATION_RUNS = 2


def adapter_version_validate(*, version_id: int) -> AdapterVersion | None:
    """Check an upload in the sandbox; on success record sha256 + manifest and enqueue staging, else reject it."""
    with transaction.atomic():
        version = _locked_version(version_id)
        if version is None or version.status not in (Status.PENDING, Status.VALIDATING):
            return version  # deleted, or finished by an earlier delivery
        lost = version.validation_runs_lost
        if lost < MAX_LOST_VALIDATION_RUNS:
            version.status = Status.VALIDATING
            version.validation_runs_lost = lost + 1  # taken back when this run returns, whatever it finds
            version.save(update_fields=["status", "validation_runs_lost"])
    if lost >= MAX_LOST_VALIDATION_RUNS:
        return adapter_version_reject(
            version_id=version_id,
            reason=f"validating this upload stopped its worker {lost} times (killed, or out of memory), so it is "
            "not tried again; upload the folder that save_pretrained wrote, and tell the operator if it happens again",
        )
    version = AdapterVersion.objects.select_related("adapter__base_model").filter(pk=version_id).first()
    if version is None:
        return None
    try:
        result = staging.upload_validate(version=version)
    except AdapterError as exc:
        return adapter_version_reject(version_id=version_id, reason=str(exc), run_returned=True)
    except BaseException:
        _validation_run_returned(version_id)
        raise
    logger.info("adapter version %s validated (child peak RSS %d MiB)", version_id, result.peak_rss_bytes >> 20)
    with transaction.atomic():
        version = _locked_version(version_id)
        if version is None or version.status != Status.VALIDATING:
            staging.validated_dir_remove(version_id)
            return version
        version.sha256 = result.sha256
        version.manifest = result.manifest.to_dict()
        version.validated_at = timezone.now()
        version.validation_runs_lost = max(0, version.validation_runs_lost - 1)
        version.save(update_fields=["sha256", "manifest", "validated_at", "validation_runs_lost"])
        transaction.on_commit(partial(_enqueue_staging, version_id))
    return version


def _validation_run_returned(version_id: int) -> None:
    """A run that failed in Python (not a dead worker) does not count towards MAX_LOST_VALIDATION_RUNS."""
    try:
        AdapterVersion.objects.filter(pk=version_id, validation_runs_lost__gt=0).update(
            validation_runs_lost=F("validation_runs_lost") - 1
        )
    except DatabaseError:  # the database may be what failed; the task's retry reports that error
        logger.exception("could not record the end of validation run of adapter version %s", version_id)


def adapter_version_reject(*, version_id: int, reason: str, run_returned: bool = False) -> AdapterVersion | None:
    """Mark an unfinished version rejected with a reason for the uploader; a finished one stays as it is.

    ``run_returned``: the reason comes from a validation run, which is over.
    """
    with transaction.atomic():
        version = _locked_version(version_id)
        if version is None or version.is_finished:
            return version
        version.status = Status.REJECTED
        version.error = reason
        version.rejected_at = timezone.now()
        if run_returned:
            version.validation_runs_lost = max(0, version.validation_runs_lost - 1)
        version.save(update_fields=["status", "error", "rejected_at", "validation_runs_lost"])
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
    staging.control_event_publish(_version_event(version, ControlEvent.ADAPTER_STAGED))


def _version_event(version: AdapterVersion, action: str) -> ControlEvent:
    adapter = version.adapter
    return ControlEvent(
        action=action,
        sha256=version.sha256,
        adapter=version.model_id,
        tenant_id=str(adapter.tenant_id),
        base_model=adapter.base_model.name,
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


def adapter_version_pin_set(*, version: AdapterVersion, pinned: bool, by: AbstractBaseUser | None) -> AdapterVersion:
    """Pin a ready version on the engines' devices, or unpin it: the row now, the engines once committed.

    The engines pin content, by sha256, and identical uploads share it: the sha256 stays in
    PINNED_ADAPTERS_KEY while any version with it is pinned. Pinning again tells the engines again
    (a repair after a lost event); unpinning one of two pinned twins leaves the engines as they are.
    """
    with transaction.atomic():
        locked = (
            AdapterVersion.objects.select_for_update(of=("self",))
            .select_related("adapter__tenant", "adapter__base_model")
            .filter(pk=version.pk)
            .first()
        )
        if locked is None:
            raise AdapterRejected(
                f"adapter version {version.pk} no longer exists (its adapter was deleted); reload the page", code=NOT_FOUND
            )
        if pinned and (locked.status != Status.READY or not locked.sha256):
            raise AdapterRejected(
                f"{locked} is {locked.status}; only a ready version can be pinned: "
                "wait until it is ready, or pin a ready version",
                code=NOT_READY,
            )
        if locked.pinned != pinned:  # pinning a pinned version keeps who pinned it first, and when
            locked.pinned = pinned
            locked.pinned_at = timezone.now() if pinned else None
            locked.pinned_by = by if pinned else None
            locked.save(update_fields=["pinned", "pinned_at", "pinned_by"])
        if locked.sha256:  # a version never ready was never pinned: the engines have nothing to hear
            transaction.on_commit(partial(_pin_publish, locked, pinned))
    return locked


def _pin_publish(version: AdapterVersion, pinned: bool) -> None:
    """Bring PINNED_ADAPTERS_KEY and the engines to what the database says of the version's content."""
    try:
        with staging.cache_lock(version.sha256):  # concurrent pins of twins, syncs and purges apply one at a time
            held, _changed = _pin_apply(version.sha256)
            if held and not pinned:
                return  # an identical upload is still pinned: its content stays on the devices
            staging.control_event_publish(_version_event(version, _pin_action(held)))
    except redis.RedisError as exc:
        verb = "pin" if pinned else "unpin"
        raise AdapterRejected(
            f"{version}: the {verb} is saved, but the engines were not told "
            f"(Redis did not answer: {exc}); {verb} it again once Redis answers",
            code=UNAVAILABLE,
        ) from exc


def adapter_pins_sync() -> tuple[list[str], list[str]]:
    """Make PINNED_ADAPTERS_KEY exactly the content of the pinned versions, telling the engines of each change.

    The repair for a set that Redis lost (a restart without persistence) or a pin whose write to it was lost:
    each sha256 missing is added with an adapter-pinned event, each extra one removed with an adapter-unpinned
    event; a set already in step publishes nothing. Returns the sha256s (added, removed).
    """
    pinned = set(AdapterVersion.objects.filter(pinned=True).exclude(sha256="").values_list("sha256", flat=True))
    added, removed = [], []
    for sha256 in sorted(pinned.symmetric_difference(staging.pinned_adapters())):
        with staging.cache_lock(sha256):  # decided again under the lock: a pin or a purge may have run meanwhile
            held, changed = _pin_apply(sha256)
            if changed:
                staging.control_event_publish(_content_pin_event(sha256, held=held))
                (added if held else removed).append(sha256)
    if added or removed:
        logger.warning("%s was out of step with the pinned versions: added %s, removed %s",
                       PINNED_ADAPTERS_KEY, added, removed)
    return added, removed


def _pin_held(sha256: str) -> bool:
    """Whether a version with this content is pinned: the engines pin content, and identical uploads share it."""
    return AdapterVersion.objects.filter(sha256=sha256, pinned=True).exists()


def _pin_apply(sha256: str) -> tuple[bool, bool]:
    """PINNED_ADAPTERS_KEY holds ``sha256`` exactly while a version with it is pinned.

    Returns whether it is held, and whether the set changed. The caller holds the content's cache lock.
    """
    held = _pin_held(sha256)
    changed = staging.pinned_adapters_add(sha256) if held else staging.pinned_adapters_remove(sha256)
    return held, changed


def _pin_action(held: bool) -> str:
    return ControlEvent.ADAPTER_PINNED if held else ControlEvent.ADAPTER_UNPINNED


def _content_pin_event(sha256: str, *, held: bool) -> ControlEvent:
    """The pin event of some content, named after a version that has it: a pinned one while it is held."""
    version = (
        AdapterVersion.objects.filter(sha256=sha256)
        .select_related("adapter__base_model")
        .order_by("-pinned", "pk")
        .first()
    )
    if version is None:  # its adapter was deleted, or the portal never had it: the engines of every base model hear
        return ControlEvent(action=_pin_action(held), sha256=sha256)
    return _version_event(version, _pin_action(held))


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
    """Remove a deleted adapter's uploads, work directories, unreferenced cache entries and pins no version holds.

    Returns the sha256s taken out of the cache; the engines hear of each with an adapter-deleted event.
    """
    for name in storage_names:
        default_storage.delete(name)
    for version_id in version_ids:
        staging.validated_dir_remove(version_id)
    removed = []
    for sha256 in sha256s:
        with staging.cache_lock(sha256):
            unpinned = _pin_drop_if_unheld(sha256)
            if AdapterVersion.objects.filter(sha256=sha256).exclude(status=Status.REJECTED).exists():
                if unpinned:  # the content stays for an identical upload that nobody pinned
                    staging.control_event_publish(ControlEvent(
                        action=ControlEvent.ADAPTER_UNPINNED, sha256=sha256, adapter=adapter, tenant_id=tenant_id
                    ))
                continue  # another version (of any tenant) has the same content
            staging.cache_dir_remove(sha256)
        removed.append(sha256)
        staging.control_event_publish(
            ControlEvent(action=ControlEvent.ADAPTER_DELETED, sha256=sha256, adapter=adapter, tenant_id=tenant_id)
        )
    return removed


def _pin_drop_if_unheld(sha256: str) -> bool:
    """Take a deleted version's content out of PINNED_ADAPTERS_KEY unless a remaining version keeps it pinned.

    Returns whether it was taken out. The caller holds the content's cache lock.
    """
    if _pin_held(sha256):
        return False
    return staging.pinned_adapters_remove(sha256)


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


def adapter_rejected_files_purge(*, older_than: timedelta) -> list[int]:
    """Delete the uploaded files of versions rejected more than ``older_than`` ago; returns their ids.

    The version stays, with its reason; its file fields are emptied and ``files_purged_at`` set, so its
    bytes stop counting towards the storage quota. Safe to run again: a purged version is skipped, and
    the files go before the row records it, so an interrupted run leaves the rest for the next one.
    """
    cutoff = timezone.now() - older_than
    due = AdapterVersion.objects.filter(status=Status.REJECTED, rejected_at__lt=cutoff, files_purged_at__isnull=True)
    purged = []
    for version_id in due.values_list("pk", flat=True):
        with transaction.atomic():
            version = _locked_version(version_id)
            if version is None or version.files_purged_at is not None:
                continue
            for field in (version.archive, version.config_file, version.weights_file):
                if field:
                    default_storage.delete(field.name)
            version.archive = version.config_file = version.weights_file = ""
            version.files_purged_at = timezone.now()
            version.save(update_fields=["archive", "config_file", "weights_file", "files_purged_at"])
        purged.append(version_id)
    if purged:
        logger.info("deleted the uploaded files of %d rejected adapter versions", len(purged))
    return purged


def adapter_work_dirs_clean() -> list[str]:
    """What a killed worker left in the adapter cache, removed (run when a worker starts)."""
    # A live run is at most one sandbox wall clock old; twice that plus a minute cannot be live.
    older_than = 2 * settings.LORAFLEET_VALIDATION_WALL_SECONDS + 60
    in_flight = set(AdapterVersion.objects.filter(status=Status.VALIDATING).values_list("pk", flat=True))
    removed = staging.work_dirs_sweep(older_than_seconds=older_than, keep_validated=in_flight)
    if removed:
        logger.info("removed %d stale work directories from the adapter cache", len(removed))
    return [path.name for path in removed]
