"""What a killed worker leaves in the adapter cache is swept when a worker starts, and nothing live is."""

from __future__ import annotations

import os
import time

import pytest
from celery.signals import worker_ready

from portal.adapters import services, staging
from portal.adapters.models import AdapterVersion
from portal.adapters.services import adapter_work_dirs_clean
from tests.portal import factories

pytestmark = pytest.mark.django_db


def aged(path, seconds: float):
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_stale_work_dirs_go_and_live_ones_stay(tenant_a, base_model, peft_dir, settings):
    settings.LORAFLEET_VALIDATION_WALL_SECONDS = 10  # so "stale" is older than 80 s
    root = staging.cache_root()
    validating, rejected = (
        services.adapter_create(tenant=tenant_a[0], name=name, base_model=base_model, upload=factories.parts_upload(peft_dir))
        for name in ("validating", "rejected")
    )  # validation is queued on commit, which never comes here: the statuses are set by hand
    AdapterVersion.objects.filter(pk=validating.pk).update(status=AdapterVersion.Status.VALIDATING)
    AdapterVersion.objects.filter(pk=rejected.pk).update(status=AdapterVersion.Status.REJECTED)
    old = [aged(root / ".validating-abc", 3600), aged(root / ".staging-def", 3600), aged(root / ".trash-123", 3600),
           aged(root / ".validated" / str(rejected.pk), 3600)]
    live = [aged(root / ".validating-now", 5), aged(root / ".validated" / str(validating.pk), 3600),
            aged(root / ("f" * 64), 3600)]  # a staged adapter is never a work directory

    removed = adapter_work_dirs_clean()

    assert sorted(removed) == sorted(p.name for p in old)
    assert not any(p.exists() for p in old) and all(p.exists() for p in live)


def test_a_starting_worker_sweeps(settings):
    import portal.adapters.tasks  # noqa: F401  (a worker imports its task modules before it is ready)

    stale = aged(staging.cache_root() / ".validating-killed", 7 * 24 * 3600)
    worker_ready.send(sender=None)
    assert not stale.exists()
