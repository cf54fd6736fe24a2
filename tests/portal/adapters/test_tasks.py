from unittest import mock

import kombu.exceptions
import pytest
import redis
from celery.exceptions import Retry

from engine_daemon.protocol import CONTROL_STREAM
from portal.adapters import services, tasks
from portal.adapters.models import AdapterVersion
from tests.portal import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def pending(tenant_a, base_model, peft_zip):
    return services.adapter_create(
        tenant=tenant_a[0], name="bot", base_model=base_model, upload=factories.archive_upload(peft_zip)
    )


def test_tasks_are_late_acking_and_retry_only_transient_errors():
    for task in (tasks.validate_adapter_version, tasks.stage_adapter_version, tasks.purge_adapter_files):
        assert task.acks_late is True
        assert set(task.autoretry_for) == set(tasks.TRANSIENT_ERRORS)
    assert not any(issubclass(ValueError, error) for error in tasks.TRANSIENT_ERRORS)


def test_a_transient_redis_error_is_retried_not_rejected(pending, run_on_commit, redis_client):
    down = redis.exceptions.ConnectionError("redis went away")
    with mock.patch.object(services.staging, "control_event_publish", side_effect=down):
        with pytest.raises(Retry), run_on_commit():  # eager mode raises the Retry a worker would schedule
            tasks.validate_adapter_version.delay(pending.pk)
    pending.refresh_from_db()
    assert pending.status == AdapterVersion.Status.READY and pending.error == ""
    assert redis_client.xlen(CONTROL_STREAM) == 0

    tasks.stage_adapter_version.delay(pending.pk)  # the retry: the version is ready, the event goes out now
    assert redis_client.xlen(CONTROL_STREAM) == 1


def test_an_unexpected_failure_rejects_the_version_and_fails_the_task(pending):
    from portal.celery import app

    app.conf.task_eager_propagates = False  # as in a worker: the failure is recorded, and on_failure runs
    with mock.patch.object(services.staging, "upload_validate", side_effect=RuntimeError("bug")):
        result = tasks.validate_adapter_version.delay(pending.pk)
    assert result.failed() and isinstance(result.result, RuntimeError)
    pending.refresh_from_db()
    assert pending.status == AdapterVersion.Status.REJECTED
    assert pending.error.startswith("internal error while processing the upload (RuntimeError")


def test_tasks_for_a_deleted_version_do_nothing(pending, run_on_commit):
    with run_on_commit():
        services.adapter_delete(adapter=pending.adapter)
    tasks.validate_adapter_version.delay(pending.pk)
    tasks.stage_adapter_version.delay(pending.pk)


@pytest.mark.django_db(transaction=True)  # enqueuing happens on a real commit, inside the request
def test_an_upload_while_the_broker_is_down_is_refused_with_503(key_client, base_model, peft_zip):
    from django.core.files.uploadedfile import SimpleUploadedFile

    down = kombu.exceptions.OperationalError("Error 111 connecting to redis")
    with mock.patch.object(tasks.validate_adapter_version, "delay", side_effect=down):
        response = key_client.post(
            "/api/v1/adapters", {"name": "bot", "archive": SimpleUploadedFile("a.zip", peft_zip.read_bytes())}
        )
    assert response.status_code == 503 and response.json()["code"] == "unavailable"
    version = AdapterVersion.objects.get()
    assert version.status == AdapterVersion.Status.REJECTED and "could not be queued" in version.error


def test_stuck_versions_are_requeued(pending, run_on_commit):
    from datetime import timedelta

    from django.core.management import call_command

    AdapterVersion.objects.filter(pk=pending.pk).update(created_at=pending.created_at - timedelta(hours=1))
    assert services.adapter_versions_requeue(older_than=timedelta(hours=2)) == []
    with run_on_commit():
        call_command("requeue_adapter_versions", "--older-than-minutes", "30")
    pending.refresh_from_db()
    assert pending.status == AdapterVersion.Status.READY
