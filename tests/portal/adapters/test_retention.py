"""A rejected version's uploaded files are deleted after LORAFLEET_REJECTED_RETENTION_SECONDS, by a task
that Celery beat sends: embedded in the worker under `make run`, its own service in docker-compose.yml."""

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from portal.adapters import services, tasks
from portal.adapters.models import AdapterVersion
from portal.devstack import Stack
from tests.portal import factories
from tests.test_compose import SERVICES, environment, mounts

pytestmark = pytest.mark.django_db
Status = AdapterVersion.Status


def upload(tenant, base_model, source, name: str) -> AdapterVersion:
    return services.adapter_create(tenant=tenant, name=name, base_model=base_model, upload=source)


def rejected(version: AdapterVersion, *, ago: timedelta) -> AdapterVersion:
    services.adapter_version_reject(version_id=version.pk, reason="not an adapter")
    AdapterVersion.objects.filter(pk=version.pk).update(rejected_at=timezone.now() - ago)
    return AdapterVersion.objects.get(pk=version.pk)


def files_of(version: AdapterVersion) -> list:
    return [django_settings.MEDIA_ROOT / f.name for f in (version.archive, version.config_file, version.weights_file) if f]


def test_old_rejected_uploads_lose_their_files_recent_and_ready_ones_keep_them(
    tenant_a, base_model, peft_zip, peft_dir, run_on_commit
):
    tenant = tenant_a[0]
    old = rejected(upload(tenant, base_model, factories.parts_upload(peft_dir), "old"), ago=timedelta(days=8))
    recent = rejected(upload(tenant, base_model, factories.archive_upload(peft_zip), "recent"), ago=timedelta(days=6))
    with run_on_commit():
        ready = upload(tenant, base_model, factories.archive_upload(peft_zip), "ready")
    AdapterVersion.objects.filter(pk=ready.pk).update(created_at=timezone.now() - timedelta(days=30))
    ready.refresh_from_db()
    assert ready.status == Status.READY
    old_files = files_of(old)
    assert len(old_files) == 2 and all(p.is_file() for p in old_files)

    assert services.adapter_rejected_files_purge(older_than=timedelta(days=7)) == [old.pk]

    old.refresh_from_db()
    assert not any(p.exists() for p in old_files)
    assert (old.archive.name, old.config_file.name, old.weights_file.name) == ("", "", "")
    assert old.files_purged_at is not None
    assert old.status == Status.REJECTED and old.error == "not an adapter"  # the row and its reason stay
    for kept in (recent, ready):
        assert all(p.is_file() for p in files_of(kept)) and files_of(kept)
        assert AdapterVersion.objects.get(pk=kept.pk).files_purged_at is None

    purged_at = old.files_purged_at
    assert services.adapter_rejected_files_purge(older_than=timedelta(days=7)) == []  # idempotent
    assert AdapterVersion.objects.get(pk=old.pk).files_purged_at == purged_at


def test_a_purge_interrupted_after_deleting_the_files_is_finished_by_the_next(tenant_a, base_model, peft_zip):
    old = rejected(upload(tenant_a[0], base_model, factories.archive_upload(peft_zip), "old"), ago=timedelta(days=8))
    for path in files_of(old):
        path.unlink()
    assert services.adapter_rejected_files_purge(older_than=timedelta(days=7)) == [old.pk]


def test_the_task_uses_the_retention_setting(tenant_a, base_model, peft_zip, settings):
    settings.LORAFLEET_REJECTED_RETENTION_SECONDS = 60
    old = rejected(upload(tenant_a[0], base_model, factories.archive_upload(peft_zip), "old"), ago=timedelta(minutes=2))
    young = rejected(upload(tenant_a[0], base_model, factories.archive_upload(peft_zip), "young"), ago=timedelta(0))
    tasks.purge_rejected_adapter_files.delay()
    assert AdapterVersion.objects.get(pk=old.pk).files_purged_at is not None
    assert AdapterVersion.objects.get(pk=young.pk).files_purged_at is None
    assert tasks.purge_rejected_adapter_files.acks_late is True


def test_beat_sends_the_task_hourly():
    from portal.celery import app

    (entry,) = [e for e in app.conf.beat_schedule.values() if e["task"] == tasks.purge_rejected_adapter_files.name]
    assert entry["schedule"] == 3600
    assert tasks.purge_rejected_adapter_files.name in app.tasks


def test_make_run_embeds_beat_in_the_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLEET_VAR_DIR", str(tmp_path))
    stack = Stack()
    spawned = {}
    monkeypatch.setattr(stack, "spawn", lambda name, command: spawned.setdefault(name, command))
    stack.start_services()
    worker = spawned["celery"]
    assert worker[worker.index("-A") + 1:worker.index("-A") + 3] == ["portal", "worker"]
    assert "--beat" in worker and worker[worker.index("--schedule") + 1] == str(tmp_path / "celerybeat-schedule")


def test_compose_runs_one_beat_like_the_worker():
    beat, worker = SERVICES["beat"], SERVICES["worker"]
    assert beat["command"][:4] == ["celery", "-A", "portal", "beat"]
    assert beat["build"] == worker["build"] and environment("beat") == environment("worker")
    assert mounts("beat") == mounts("worker")
    assert "celerybeat@" in " ".join(beat["healthcheck"]["test"]) and "--enable-remote-control" in beat["command"]
    assert "celery@" in " ".join(worker["healthcheck"]["test"])  # the worker's ping is its own, not beat's
