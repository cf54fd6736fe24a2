import json

import pytest

from engine_daemon.peft_format import MANIFEST_FILE, AdapterManifest, adapter_content_sha256
from engine_daemon.protocol import CONTROL_STREAM, ControlEvent
from portal.adapters import services, staging
from portal.adapters.errors import AdapterRejected
from portal.adapters.models import Adapter, AdapterVersion
from tests.portal import factories
from tests.portal.peft_files import tar_folder

Status = AdapterVersion.Status
pytestmark = pytest.mark.django_db


def control_events(redis_client) -> list[ControlEvent]:
    return [ControlEvent.from_redis(fields) for _id, fields in redis_client.xrange(CONTROL_STREAM)]


def create(tenant, base_model, upload, name="support-bot", **kwargs):
    return services.adapter_create(tenant=tenant, name=name, base_model=base_model, upload=upload, **kwargs)


def test_upload_is_validated_staged_and_made_default(tenant_a, base_model, peft_dir, peft_zip, run_on_commit, redis_client, settings):
    tenant, user = tenant_a
    with run_on_commit():
        version = create(tenant, base_model, factories.archive_upload(peft_zip), uploaded_by=user)
    version.refresh_from_db()

    assert version.status == Status.READY, version.error
    assert version.number == 1 and version.uploader_label == "alice"
    expected_sha = adapter_content_sha256(peft_dir / "adapter_config.json", peft_dir / "adapter_model.safetensors")
    assert version.sha256 == expected_sha
    assert version.adapter.default_version == version
    folder = settings.ADAPTER_CACHE_DIR / expected_sha
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE]
    assert (folder / "adapter_model.safetensors").read_bytes() == (peft_dir / "adapter_model.safetensors").read_bytes()
    manifest = AdapterManifest.from_dict(json.loads((folder / MANIFEST_FILE).read_text()))
    assert manifest.rank == 4 and manifest.target_modules == ["q_proj", "v_proj"]
    assert manifest.base_fingerprint == base_model.fingerprint
    assert version.manifest == manifest.to_dict()
    # nothing left behind but the entry itself
    assert [p.name for p in settings.ADAPTER_CACHE_DIR.iterdir() if p.name != ".validated"] == [expected_sha]
    assert not any((settings.ADAPTER_CACHE_DIR / ".validated").iterdir())
    (event,) = control_events(redis_client)
    assert (event.action, event.sha256, event.adapter) == (ControlEvent.ADAPTER_STAGED, expected_sha, "support-bot@1")
    assert (event.tenant_id, event.base_model) == (str(tenant.pk), "random:tiny")


def test_two_part_and_tar_uploads_are_accepted(tenant_a, base_model, peft_dir, tmp_path, run_on_commit):
    tenant, _ = tenant_a
    with run_on_commit():
        parts = create(tenant, base_model, factories.parts_upload(peft_dir), name="parts")
        tarball = create(tenant, base_model, factories.archive_upload(tar_folder(peft_dir, tmp_path / "a.tar.gz")), name="tar")
    for version in (parts, tarball):
        version.refresh_from_db()
        assert version.status == Status.READY, version.error
    assert parts.sha256 == tarball.sha256


def test_versions_are_numbered_and_a_newer_ready_version_becomes_default(tenant_a, base_model, peft_zip, peft_dir_v2, run_on_commit):
    tenant, _ = tenant_a
    with run_on_commit():
        first = create(tenant, base_model, factories.archive_upload(peft_zip))
        second = services.adapter_version_create(adapter=first.adapter, upload=factories.parts_upload(peft_dir_v2))
        third = services.adapter_version_create(
            adapter=first.adapter, upload=factories.archive_upload(peft_zip), promote=False
        )
    assert [v.number for v in (first, second, third)] == [1, 2, 3]
    adapter = Adapter.objects.get(pk=first.adapter_id)
    assert adapter.default_version.number == 2  # 3 was uploaded with promote=False
    assert AdapterVersion.objects.get(pk=third.pk).status == Status.READY


def test_an_older_version_finishing_late_does_not_take_the_default(tenant_a, base_model, peft_zip, run_on_commit):
    tenant, _ = tenant_a
    first = create(tenant, base_model, factories.archive_upload(peft_zip))  # not processed yet
    with run_on_commit():
        second = services.adapter_version_create(adapter=first.adapter, upload=factories.archive_upload(peft_zip))
    services.adapter_version_validate(version_id=first.pk)
    with run_on_commit():
        services.adapter_version_stage(version_id=first.pk)
    assert AdapterVersion.objects.get(pk=first.pk).status == Status.READY
    assert Adapter.objects.get(pk=first.adapter_id).default_version_id == second.pk


def test_promote_and_roll_back(tenant_a, base_model, peft_zip, peft_dir_v2, run_on_commit):
    tenant, _ = tenant_a
    with run_on_commit():
        first = create(tenant, base_model, factories.archive_upload(peft_zip))
        second = services.adapter_version_create(adapter=first.adapter, upload=factories.parts_upload(peft_dir_v2))
    adapter = services.adapter_default_set(adapter=first.adapter, number=1)
    assert adapter.default_version_id == first.pk
    adapter = services.adapter_default_set(adapter=adapter, number=2)
    assert adapter.default_version_id == second.pk

    with pytest.raises(AdapterRejected) as missing:
        services.adapter_default_set(adapter=adapter, number=9)
    assert missing.value.code == "not_found"


def test_only_a_ready_version_can_be_default(tenant_a, base_model, peft_zip):
    tenant, _ = tenant_a
    version = create(tenant, base_model, factories.archive_upload(peft_zip))  # still pending
    with pytest.raises(AdapterRejected, match="only a ready version") as error:
        services.adapter_default_set(adapter=version.adapter, number=1)
    assert error.value.code == "not_ready"


@pytest.mark.parametrize(
    ("name", "message"),
    [("Bad Name", "not valid"), ("-x", "not valid"), ("a@1", "not valid"), ("x" * 65, "not valid")],
)
def test_adapter_names_are_slugs(tenant_a, base_model, peft_zip, name, message):
    with pytest.raises(AdapterRejected, match=message):
        create(tenant_a[0], base_model, factories.archive_upload(peft_zip), name=name)


def test_adapter_names_are_unique_per_tenant_only(tenant_a, tenant_b, base_model, peft_zip):
    create(tenant_a[0], base_model, factories.archive_upload(peft_zip))
    with pytest.raises(AdapterRejected, match="already exists") as error:
        create(tenant_a[0], base_model, factories.archive_upload(peft_zip))
    assert error.value.code == "conflict"
    create(tenant_b[0], base_model, factories.archive_upload(peft_zip))  # the same name in another tenant is fine


def test_an_adapter_may_not_take_a_base_model_name(tenant_a, db, peft_zip):
    import dataclasses

    from engine_daemon.peft_format import describe_base_model
    from portal.base_models.services import base_model_register

    base = base_model_register(descriptor=dataclasses.replace(describe_base_model("random:tiny"), name="tiny-llama"))
    with pytest.raises(AdapterRejected, match="name of a base model"):
        create(tenant_a[0], base, factories.archive_upload(peft_zip), name="tiny-llama")


def test_upload_over_the_cap_is_refused(tenant_a, base_model, peft_zip, settings):
    settings.LORAFLEET_MAX_UPLOAD_BYTES = 100
    with pytest.raises(AdapterRejected, match="LORAFLEET_MAX_UPLOAD_BYTES") as error:
        create(tenant_a[0], base_model, factories.archive_upload(peft_zip))
    assert error.value.code == "too_large"
    assert not Adapter.objects.exists()


def test_redelivered_tasks_do_no_harm(tenant_a, base_model, peft_zip, run_on_commit, redis_client, settings):
    with run_on_commit():
        version = create(tenant_a[0], base_model, factories.archive_upload(peft_zip))
    version.refresh_from_db()
    ready_at = version.ready_at
    services.adapter_version_validate(version_id=version.pk)  # validate again: finished, nothing to do
    services.adapter_version_stage(version_id=version.pk)  # stage again: publishes the event again, that is all
    version.refresh_from_db()
    assert (version.status, version.ready_at) == (Status.READY, ready_at)
    assert [e.sha256 for e in control_events(redis_client)] == [version.sha256] * 2
    assert staging.cache_dir_is_complete(version.sha256)


def test_a_worker_that_died_while_validating_is_redone(tenant_a, base_model, peft_zip, run_on_commit):
    version = create(tenant_a[0], base_model, factories.archive_upload(peft_zip))
    AdapterVersion.objects.filter(pk=version.pk).update(status=Status.VALIDATING)  # the first delivery died here
    with run_on_commit():
        services.adapter_version_validate(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == Status.READY


def test_staging_without_the_validated_copy_starts_again_from_the_upload(tenant_a, base_model, peft_zip, run_on_commit, settings):
    version = create(tenant_a[0], base_model, factories.archive_upload(peft_zip))
    services.adapter_version_validate(version_id=version.pk)
    staging.validated_dir_remove(version.pk)  # e.g. validated on another machine
    services.adapter_version_stage(version_id=version.pk)
    version.refresh_from_db()
    assert version.status == Status.READY
    assert staging.cache_dir_is_complete(version.sha256)


def test_delete_purges_files_unless_another_version_shares_them(
    tenant_a, tenant_b, base_model, peft_zip, peft_dir_v2, run_on_commit, redis_client, settings
):
    with run_on_commit():
        mine = create(tenant_a[0], base_model, factories.archive_upload(peft_zip), name="one")
        other = services.adapter_version_create(adapter=mine.adapter, upload=factories.parts_upload(peft_dir_v2))
        theirs = create(tenant_b[0], base_model, factories.archive_upload(peft_zip), name="same-content")
    mine.refresh_from_db(), other.refresh_from_db(), theirs.refresh_from_db()
    assert mine.sha256 == theirs.sha256 != other.sha256
    uploads = [mine.archive.path, other.config_file.path, other.weights_file.path]
    redis_client.delete(CONTROL_STREAM)

    with run_on_commit():
        services.adapter_delete(adapter=mine.adapter)

    assert not Adapter.objects.filter(pk=mine.adapter_id).exists()
    assert not AdapterVersion.objects.filter(pk__in=[mine.pk, other.pk]).exists()
    assert staging.cache_dir_is_complete(theirs.sha256)  # tenant B still uses that content
    assert not (settings.ADAPTER_CACHE_DIR / other.sha256).exists()
    assert not any(__import__("os").path.exists(p) for p in uploads)
    (event,) = control_events(redis_client)
    assert (event.action, event.sha256, event.adapter) == (ControlEvent.ADAPTER_DELETED, other.sha256, "one")


def test_an_upload_deleted_while_validating_leaves_nothing(tenant_a, base_model, peft_zip, run_on_commit, settings):
    version = create(tenant_a[0], base_model, factories.archive_upload(peft_zip))
    with run_on_commit():
        services.adapter_delete(adapter=version.adapter)
    assert services.adapter_version_validate(version_id=version.pk) is None
    assert services.adapter_version_stage(version_id=version.pk) is None
    assert not list(settings.MEDIA_ROOT.rglob("*.zip"))
