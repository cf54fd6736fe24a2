"""Operators set a tenant's upload quotas in the Django admin."""

import pytest
from django.test import Client

from portal.adapters.selectors import QuotaUse, tenant_upload_quota
from portal.tenants.models import Tenant
from portal.tenants.services import tenant_create
from tests.portal import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator_client():
    client = Client()
    client.force_login(factories.user_create("root", is_staff=True, is_superuser=True))
    return client


def change_form(tenant: Tenant, **quotas) -> dict:
    return {
        "slug": tenant.slug, "name": tenant.name, "is_active": "on",
        "requests_per_minute": "600", "tokens_per_minute": "1000000",
        "max_storage_bytes": "", "max_adapters": "", "max_versions_per_adapter": "",
        "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
        **quotas,
    }


def test_the_quotas_are_edited_in_the_admin(operator_client, settings):
    settings.LORAFLEET_TENANT_MAX_ADAPTERS = 100
    tenant = tenant_create(slug="acme")
    url = f"/admin/tenants/tenant/{tenant.pk}/change/"
    page = operator_client.get(url).content.decode()
    assert "Upload quotas" in page and 'name="max_storage_bytes"' in page and "0: no limit" in page

    response = operator_client.post(url, change_form(tenant, max_adapters="3", max_versions_per_adapter="0"))
    assert response.status_code == 302, response.content.decode()[:2000]
    tenant.refresh_from_db()
    assert (tenant.max_storage_bytes, tenant.max_adapters, tenant.max_versions_per_adapter) == (None, 3, 0)
    quota = tenant_upload_quota(tenant=tenant)
    assert quota.adapters == QuotaUse(0, 3) and quota.versions.limit is None
    assert quota.storage_bytes.limit == settings.LORAFLEET_TENANT_MAX_STORAGE_BYTES


def test_a_new_tenant_follows_the_settings(db):
    tenant = tenant_create(slug="fresh")
    assert (tenant.max_storage_bytes, tenant.max_adapters, tenant.max_versions_per_adapter) == (None, None, None)
