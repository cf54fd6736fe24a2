"""Celery entry points to the adapter services: load by primary key, call one service.

Each task is idempotent (``acks_late``: a worker that dies mid-task gets it redelivered) and
retries only what may pass by itself: Redis or the database being unreachable. Any other failure
is final: the version is marked rejected with an "internal error" reason, and the error is raised
to Celery so that it is logged, never swallowed.
"""

from __future__ import annotations

import logging
from typing import Any

import kombu.exceptions
import redis.exceptions
from celery import Task, shared_task
from celery.signals import worker_ready
from django.conf import settings
from django.db import InterfaceError, OperationalError

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS = (
    kombu.exceptions.OperationalError,  # enqueuing the next task while the broker is down
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.LockError,
    OperationalError,
    InterfaceError,
)
_RETRY = dict(autoretry_for=TRANSIENT_ERRORS, retry_backoff=2, retry_backoff_max=60, retry_jitter=True, max_retries=8)


@worker_ready.connect
def _clean_work_dirs_on_start(**_: Any) -> None:
    """A worker killed mid-run (OOM killer, kill -9) leaves scratch directories; the next one to start sweeps them."""
    from portal.adapters.services import adapter_work_dirs_clean

    try:
        adapter_work_dirs_clean()
    except Exception:  # a sweep that fails must not keep the worker from serving
        logger.exception("could not clean the adapter cache's work directories")


class AdapterVersionTask(Task):
    """When a task on one version fails for good, the version must not wait in 'validating' forever."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        from portal.adapters.services import adapter_version_reject

        version_id = kwargs.get("version_id", args[0] if args else None)
        if version_id is None:
            return
        try:
            adapter_version_reject(
                version_id=version_id,
                reason=f"internal error while processing the upload ({type(exc).__name__}, task {task_id}); "
                "upload it again, and tell the operator if it happens again",
            )
        except Exception:  # the database itself may be what failed; Celery logs the original error
            logger.exception("could not mark adapter version %s as failed", version_id)


# The sandbox's wall clock bounds a validation run; Celery's limit (prefork pools) is the backstop.
@shared_task(base=AdapterVersionTask, acks_late=True, time_limit=settings.LORAFLEET_VALIDATION_WALL_SECONDS + 120, **_RETRY)
def validate_adapter_version(version_id: int) -> None:
    from portal.adapters.services import adapter_version_validate

    adapter_version_validate(version_id=version_id)


@shared_task(base=AdapterVersionTask, acks_late=True, **_RETRY)
def stage_adapter_version(version_id: int) -> None:
    from portal.adapters.services import adapter_version_stage

    adapter_version_stage(version_id=version_id)


@shared_task(acks_late=True, **_RETRY)
def purge_adapter_files(
    *, sha256s: list[str], storage_names: list[str], version_ids: list[int], tenant_id: str, adapter: str
) -> None:
    from portal.adapters.services import adapter_files_purge

    adapter_files_purge(
        sha256s=sha256s, storage_names=storage_names, version_ids=version_ids, tenant_id=tenant_id, adapter=adapter
    )


@shared_task(acks_late=True, **_RETRY)
def purge_rejected_adapter_files() -> None:
    """Run by Celery beat (CELERY_BEAT_SCHEDULE): rejected uploads' files go after the retention period."""
    from datetime import timedelta

    from portal.adapters.services import adapter_rejected_files_purge

    adapter_rejected_files_purge(older_than=timedelta(seconds=settings.LORAFLEET_REJECTED_RETENTION_SECONDS))


@shared_task(acks_late=True, **_RETRY)
def sync_adapter_pins() -> None:
    """Run by Celery beat (CELERY_BEAT_SCHEDULE): the engines' set of pins heals from the database after a lost write."""
    from portal.adapters.services import adapter_pins_sync

    adapter_pins_sync()
