"""A validation that takes its worker down is not redelivered forever; one that returns is not counted."""

from __future__ import annotations

import pytest

from portal.adapters import services, staging
from portal.adapters.models import AdapterVersion
from tests.portal import factories

Status = AdapterVersion.Status
pytestmark = pytest.mark.django_db


def pending(tenant_a, base_model, folder, name="bot", **upload) -> AdapterVersion:
    # Not under run_on_commit: the validation stays queued, for the test to run by hand.
    return services.adapter_create(
        tenant=tenant_a[0], name=name, base_model=base_model, upload=factories.parts_upload(folder, **upload)
    )


def test_runs_that_return_are_taken_back(tenant_a, base_model, peft_dir, peft_pickled_dir):
    good = pending(tenant_a, base_model, peft_dir)
    services.adapter_version_validate(version_id=good.pk)
    good.refresh_from_db()
    assert good.validated_at is not None and good.validation_runs_lost == 0

    bad = pending(tenant_a, base_model, peft_pickled_dir, name="bad", weights_name="adapter_model.bin")
    services.adapter_version_validate(version_id=bad.pk)
    bad.refresh_from_db()
    assert bad.status == Status.REJECTED and bad.validation_runs_lost == 0


def test_a_run_that_fails_in_the_worker_is_taken_back_and_raised(tenant_a, base_model, peft_dir, monkeypatch):
    version = pending(tenant_a, base_model, peft_dir)

    def database_gone(**_):
        raise ConnectionError("the database went away")  # what a transient failure looks like to the service

    monkeypatch.setattr(staging, "upload_validate", database_gone)
    with pytest.raises(ConnectionError):
        services.adapter_version_validate(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == Status.VALIDATING and version.validation_runs_lost == 0


def test_a_version_whose_runs_killed_the_worker_twice_is_rejected(tenant_a, base_model, peft_dir):
    version = pending(tenant_a, base_model, peft_dir)
    # Two deliveries that began and never returned: the worker died under them (kill -9, the OOM killer).
    AdapterVersion.objects.filter(pk=version.pk).update(
        status=Status.VALIDATING, validation_runs_lost=services.MAX_LOST_VALIDATION_RUNS
    )
    services.adapter_version_validate(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == Status.REJECTED
    assert "stopped its worker 2 times (killed, or out of memory), so it is not tried again" in version.error


def test_one_lost_run_is_tried_again(tenant_a, base_model, peft_dir):
    version = pending(tenant_a, base_model, peft_dir)
    AdapterVersion.objects.filter(pk=version.pk).update(status=Status.VALIDATING, validation_runs_lost=1)
    services.adapter_version_validate(version_id=version.pk)
    version.refresh_from_db()
    assert version.validated_at is not None and version.validation_runs_lost == 1  # the lost run stays counted
