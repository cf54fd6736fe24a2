"""The keys page shows the tenant's serving limits and each key's own, read-only; operators edit them in the admin."""

import pytest
from django.test import Client

from portal.api_keys.models import TenantAPIKey
from portal.tenants.models import Membership
from tests.portal import factories

pytestmark = pytest.mark.django_db


def test_the_owner_sees_the_tenants_limits_and_each_keys_own(tenant_a):
    tenant, owner = tenant_a
    tenant.requests_per_minute, tenant.tokens_per_minute, tenant.max_in_flight = 120, None, 16
    tenant.fair_share_weight = 2.5
    tenant.save()
    limited, _secret = factories.api_key_for(tenant, name="limited")
    limited.requests_per_minute, limited.tokens_per_minute = 30, 5000
    limited.save()
    factories.api_key_for(tenant, name="plain")
    client = Client()
    client.force_login(owner)
    page = client.get("/keys/").content.decode()
    assert '<dd id="limit-requests">120</dd>' in page and '<dd id="limit-tokens">no limit</dd>' in page
    assert '<dd id="limit-in-flight">at most 16</dd>' in page and '<dd id="limit-weight">2.5</dd>' in page
    assert "30 requests/min, 5000 tokens/min" in page and "the tenant&#x27;s" in page
    assert 'name="requests_per_minute"' not in page and 'name="max_in_flight"' not in page  # read-only


def test_a_member_does_not_see_the_keys_page(tenant_a):
    member = factories.user_in(tenant_a[0], role=Membership.Role.MEMBER)
    client = Client()
    client.force_login(member)
    assert client.get("/keys/").status_code == 403


def test_operators_set_a_keys_own_limits_in_the_admin(tenant_a):
    key, _secret = factories.api_key_for(tenant_a[0], name="ci")
    client = Client()
    client.force_login(factories.user_create("root", is_staff=True, is_superuser=True))
    url = f"/admin/api_keys/tenantapikey/{key.pk}/change/"
    page = client.get(url).content.decode()
    assert 'name="requests_per_minute"' in page and 'name="tokens_per_minute"' in page
    assert "Empty: only the tenant's limit applies." in page
    form = {"name": "ci", "tenant": str(tenant_a[0].pk), "scopes": '["inference"]', "expiry_date_0": "",
            "expiry_date_1": "", "requests_per_minute": "10", "tokens_per_minute": "", "created_by": "",
            "last_used_at_0": "", "last_used_at_1": "", "revoked_at_0": "", "revoked_at_1": ""}
    response = client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:3000]
    key = TenantAPIKey.objects.get(pk=key.pk)
    assert (key.requests_per_minute, key.tokens_per_minute) == (10, None)
    assert client.post(url, {**form, "requests_per_minute": "0"}).status_code == 200  # at least 1, or empty
