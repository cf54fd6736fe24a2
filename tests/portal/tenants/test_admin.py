"""Operators set a tenant's upload quotas and serving limits in the Django admin."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
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
        "fair_share_weight": "1.0", "requests_per_minute": "600", "tokens_per_minute": "1000000", "max_in_flight": "64",
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


def test_the_serving_limits_are_edited_in_the_admin(operator_client):
    tenant = tenant_create(slug="acme")
    assert (tenant.fair_share_weight, tenant.requests_per_minute, tenant.tokens_per_minute, tenant.max_in_flight) == (
        1.0, 600, 1_000_000, 64)
    url = f"/admin/tenants/tenant/{tenant.pk}/change/"
    page = operator_client.get(url).content.decode()
    assert "Serving limits" in page and "all keys together" in page
    assert all(f'name="{field}"' in page for field in ("fair_share_weight", "requests_per_minute", "tokens_per_minute",
                                                        "max_in_flight"))

    response = operator_client.post(url, change_form(tenant, fair_share_weight="2.5", requests_per_minute="120",
                                                     tokens_per_minute="", max_in_flight="8"))
    assert response.status_code == 302, response.content.decode()[:2000]
    tenant.refresh_from_db()
    assert (tenant.fair_share_weight, tenant.requests_per_minute, tenant.tokens_per_minute, tenant.max_in_flight) == (
        2.5, 120, None, 8)
    operator_client.post(url, change_form(tenant, max_in_flight=""))
    tenant.refresh_from_db()
    assert tenant.max_in_flight is None  # no cap


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", ""])
def test_a_fair_share_weight_is_above_zero(operator_client, weight):
    tenant = tenant_create(slug="acme")
    response = operator_client.post(f"/admin/tenants/tenant/{tenant.pk}/change/",
                                    change_form(tenant, fair_share_weight=weight))
    assert response.status_code == 200 and "errornote" in response.content.decode()
    tenant.refresh_from_db()
    assert tenant.fair_share_weight == 1.0


@pytest.mark.parametrize("field", ["requests_per_minute", "tokens_per_minute", "max_in_flight"])
def test_a_limit_is_at_least_one_or_empty(operator_client, field):
    tenant = tenant_create(slug="acme")
    response = operator_client.post(f"/admin/tenants/tenant/{tenant.pk}/change/", change_form(tenant, **{field: "0"}))
    assert response.status_code == 200 and "errornote" in response.content.decode()


def test_the_weight_is_validated_in_the_model_and_the_database(db):
    tenant = tenant_create(slug="acme")
    tenant.fair_share_weight = 0.0
    with pytest.raises(ValidationError) as caught:
        tenant.full_clean()
    assert "above 0" in str(caught.value.message_dict["fair_share_weight"])
    with pytest.raises(IntegrityError), transaction.atomic():
        tenant.save()
