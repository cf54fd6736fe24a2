"""Per-tenant upload quotas: bytes stored, adapters, versions per adapter. Checked before anything is
stored; a tenant's own limit beats the setting; 0 means no limit; purged files no longer count."""

from datetime import timedelta

import pytest
from django.test import Client

from portal.adapters import services
from portal.adapters.errors import AdapterRejected
from portal.adapters.models import Adapter, AdapterVersion
from portal.adapters.selectors import QuotaUse, tenant_upload_quota
from tests.portal import factories

pytestmark = pytest.mark.django_db
API = "/api/v1/adapters"


@pytest.fixture
def tenant(tenant_a):
    return tenant_a[0]


@pytest.fixture
def zip_size(peft_zip) -> int:
    return peft_zip.stat().st_size


def create(tenant, base_model, peft_zip, name: str):
    return services.adapter_create(tenant=tenant, name=name, base_model=base_model, upload=factories.archive_upload(peft_zip))


def add_version(adapter, peft_zip):
    return services.adapter_version_create(adapter=adapter, upload=factories.archive_upload(peft_zip))


def stored_files(settings) -> list:
    folder = settings.MEDIA_ROOT / "adapters"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def refused(call) -> AdapterRejected:
    with pytest.raises(AdapterRejected) as error:
        call()
    assert error.value.code == "quota_exceeded" and error.value.http_status == 403
    return error.value


def label(size: int) -> str:
    return services._size_label(size)


def test_the_adapter_quota(tenant, base_model, peft_zip, settings):
    settings.LORAFLEET_TENANT_MAX_ADAPTERS = 2
    create(tenant, base_model, peft_zip, "one")
    create(tenant, base_model, peft_zip, "two")
    before = stored_files(settings)
    error = refused(lambda: create(tenant, base_model, peft_zip, "three"))
    assert error.message == (
        "tenant tenant-a has 2 of 2 adapters, its adapter quota: delete adapters you no longer need, "
        "or ask the operator to raise it"
    )
    assert sorted(Adapter.objects.values_list("name", flat=True)) == ["one", "two"]
    assert AdapterVersion.objects.count() == 2 and stored_files(settings) == before


def test_the_version_quota(tenant, base_model, peft_zip, settings):
    settings.LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER = 2
    adapter = create(tenant, base_model, peft_zip, "bot").adapter
    add_version(adapter, peft_zip)
    before = stored_files(settings)
    error = refused(lambda: add_version(adapter, peft_zip))
    assert error.message == (
        "adapter 'bot' has 2 of 2 versions, the quota per adapter in tenant tenant-a: upload this one as a new "
        "adapter, or ask the operator to raise it"
    )
    assert list(adapter.versions.order_by("number").values_list("number", flat=True)) == [1, 2]
    assert stored_files(settings) == before
    create(tenant, base_model, peft_zip, "bot-2")  # the quota is per adapter


def test_the_storage_quota(tenant, base_model, peft_zip, zip_size, settings):
    settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES = limit = 2 * zip_size + zip_size // 2
    adapter = create(tenant, base_model, peft_zip, "bot").adapter
    add_version(adapter, peft_zip)
    before = stored_files(settings)
    error = refused(lambda: add_version(adapter, peft_zip))
    assert error.message == (
        f"tenant tenant-a stores {label(2 * zip_size)} of {label(limit)}; this upload of {label(zip_size)} would "
        "pass the storage quota: delete adapters you no longer need, or ask the operator to raise it"
    )
    refused(lambda: create(tenant, base_model, peft_zip, "other"))  # a new adapter's first version too
    assert AdapterVersion.objects.count() == 2 and not Adapter.objects.filter(name="other").exists()
    assert stored_files(settings) == before


def test_an_upload_filling_the_storage_quota_exactly_is_accepted(tenant, base_model, peft_zip, zip_size, settings):
    settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES = zip_size
    create(tenant, base_model, peft_zip, "bot")
    refused(lambda: create(tenant, base_model, peft_zip, "bot-2"))


def test_the_tenants_own_limits_beat_the_settings(tenant, base_model, peft_zip, settings):
    settings.LORAFLEET_TENANT_MAX_ADAPTERS = 1
    settings.LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER = 5
    tenant.max_adapters = 2
    tenant.max_versions_per_adapter = 1
    tenant.save()
    adapter = create(tenant, base_model, peft_zip, "one").adapter
    create(tenant, base_model, peft_zip, "two")
    assert "2 of 2 adapters" in refused(lambda: create(tenant, base_model, peft_zip, "three")).message
    assert "1 of 1 versions" in refused(lambda: add_version(adapter, peft_zip)).message


def test_zero_means_no_limit_in_the_settings_and_on_the_tenant(tenant, tenant_b, base_model, peft_zip, settings):
    settings.LORAFLEET_TENANT_MAX_ADAPTERS = 0
    settings.LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER = 0
    settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES = 0
    adapter = create(tenant, base_model, peft_zip, "one").adapter
    create(tenant, base_model, peft_zip, "two")
    add_version(adapter, peft_zip)
    quota = tenant_upload_quota(tenant=tenant, adapter=adapter)
    assert (quota.adapters, quota.versions) == (QuotaUse(2, None), QuotaUse(2, None))
    assert quota.storage_bytes.limit is None

    settings.LORAFLEET_TENANT_MAX_ADAPTERS = 1
    other = tenant_b[0]
    other.max_adapters = 0
    other.save()
    create(other, base_model, peft_zip, "one")
    create(other, base_model, peft_zip, "two")
    refused(lambda: create(tenant, base_model, peft_zip, "three"))  # tenant A still has the setting's limit


def test_purged_files_no_longer_count(tenant, base_model, peft_zip, zip_size, settings):
    settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES = zip_size + zip_size // 2
    settings.LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER = 1
    first = create(tenant, base_model, peft_zip, "bot")
    refused(lambda: add_version(first.adapter, peft_zip))
    services.adapter_version_reject(version_id=first.pk, reason="bad")
    refused(lambda: add_version(first.adapter, peft_zip))  # a rejected upload counts while its files are kept
    AdapterVersion.objects.filter(pk=first.pk).update(rejected_at=first.created_at - timedelta(days=30))
    assert services.adapter_rejected_files_purge(older_than=timedelta(days=7)) == [first.pk]
    assert tenant_upload_quota(tenant=tenant, adapter=first.adapter).storage_bytes.used == 0
    assert add_version(first.adapter, peft_zip).number == 2


def test_quotas_are_per_tenant(tenant, tenant_b, base_model, peft_zip, settings):
    settings.LORAFLEET_TENANT_MAX_ADAPTERS = 1
    create(tenant, base_model, peft_zip, "bot")
    create(tenant_b[0], base_model, peft_zip, "bot")
    assert tenant_upload_quota(tenant=tenant_b[0]).adapters == QuotaUse(1, 1)


# ---- REST API and page


def test_api_a_refused_upload_is_403_quota_exceeded(key_client, base_model, peft_zip, zip_size, settings):
    settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES = zip_size // 2
    response = key_client.post(API, {"name": "bot", "archive": factories.uploaded(peft_zip)})
    assert response.status_code == 403
    assert response.json()["code"] == "quota_exceeded"
    assert "would pass the storage quota" in response.json()["detail"]
    assert not Adapter.objects.exists() and stored_files(settings) == []


def test_api_quota_shows_use_and_limits(key_client, tenant, base_model, peft_zip, zip_size, settings):
    settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES = 0
    tenant.max_adapters = 7
    tenant.save()
    adapter = create(tenant, base_model, peft_zip, "bot").adapter
    add_version(adapter, peft_zip)
    body = key_client.get("/api/v1/quota").json()
    assert body == {
        "storage_bytes": {"used": 2 * zip_size, "limit": None},
        "adapters": {"used": 1, "limit": 7},
        "versions": {"used": 0, "limit": 50},
    }
    assert key_client.get("/api/v1/quota", {"adapter": "bot"}).json()["versions"] == {"used": 2, "limit": 50}
    assert key_client.get("/api/v1/quota", {"adapter": "nope"}).status_code == 404
    schema = key_client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    assert "/api/v1/quota" in schema["paths"]


def test_the_upload_page_shows_the_quota(tenant_a, base_model, peft_zip, settings):
    tenant, user = tenant_a
    settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES = 10 << 20
    settings.LORAFLEET_TENANT_MAX_ADAPTERS = 4
    settings.LORAFLEET_TENANT_MAX_VERSIONS_PER_ADAPTER = 3
    adapter = create(tenant, base_model, peft_zip, "bot").adapter
    add_version(adapter, peft_zip)
    client = Client()
    client.force_login(user)
    page = client.get("/adapters/bot/upload/").content.decode()
    assert 'id="quota-adapters">1 of 4<' in page
    assert 'id="quota-versions">2 of 3<' in page
    stored = 2 * peft_zip.stat().st_size
    assert f'id="quota-storage">{_filesize(stored)} of 10.0\xa0MB<' in page
    new = client.get("/adapters/new/").content.decode()
    assert 'id="quota-versions">at most 3<' in new and "Versions per adapter" in new

    settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES = 0
    settings.LORAFLEET_TENANT_MAX_ADAPTERS = 0
    unlimited = client.get("/adapters/new/").content.decode()
    assert f'id="quota-storage">{_filesize(stored)}, no limit<' in unlimited
    assert 'id="quota-adapters">1, no limit<' in unlimited


def _filesize(size: int) -> str:
    from django.template.defaultfilters import filesizeformat

    return filesizeformat(size)
