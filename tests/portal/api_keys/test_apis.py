import pytest
from rest_framework.test import APIClient

from portal.api_keys.models import TenantAPIKey
from portal.api_keys.services import api_key_authenticate
from portal.tenants.models import Membership
from portal.tenants.services import tenant_member_set
from tests.portal import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner_client(tenant_a):
    client = APIClient()
    client.force_login(tenant_a[1])
    return client


def test_create_list_and_revoke(owner_client, tenant_a):
    created = owner_client.post("/api/v1/keys", {"name": "ci", "scopes": ["inference", "manage"]}, format="json")
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["key"].startswith(body["prefix"] + ".") and body["scopes"] == ["inference", "manage"]
    assert api_key_authenticate(raw_key=body["key"])[1] == tenant_a[0]

    listed = owner_client.get("/api/v1/keys").json()
    assert [k["prefix"] for k in listed] == [body["prefix"]]
    assert "key" not in listed[0] and body["key"] not in str(listed)

    revoked = owner_client.post(f"/api/v1/keys/{body['prefix']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert TenantAPIKey.objects.get(prefix=body["prefix"]).revoked


def test_create_defaults_to_the_inference_scope_and_validates(owner_client):
    assert owner_client.post("/api/v1/keys", {"name": "x"}, format="json").json()["scopes"] == ["inference"]
    bad = owner_client.post("/api/v1/keys", {"name": "x", "scopes": ["root"]}, format="json")
    assert bad.status_code == 400 and "scopes" in bad.json()


def test_a_key_cannot_manage_keys(tenant_a):
    _key, secret = factories.api_key_for(tenant_a[0])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert client.get("/api/v1/keys").status_code in (401, 403)
    assert client.post("/api/v1/keys", {"name": "escalate"}, format="json").status_code in (401, 403)
    assert TenantAPIKey.objects.count() == 1


def test_a_member_cannot_manage_keys(tenant_a):
    member = factories.user_create("mallory")
    tenant_member_set(tenant=tenant_a[0], user=member, role=Membership.Role.MEMBER)
    client = APIClient()
    client.force_login(member)
    response = client.post("/api/v1/keys", {"name": "x"}, format="json")
    assert response.status_code == 403 and "admin role" in response.json()["detail"]


def test_a_json_body_nested_too_deeply_is_a_400(owner_client):
    response = owner_client.post("/api/v1/keys", b"[" * 50_000, content_type="application/json")
    assert response.status_code == 400 and "too deeply" in response.json()["detail"]
