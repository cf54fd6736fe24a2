"""Tenant A's key or user cannot list, read, use, promote or delete anything of tenant B: 404, never 403 or 200."""

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from rest_framework.test import APIClient

from portal.adapters import services
from portal.adapters.errors import AdapterRejected
from portal.adapters.models import Adapter, AdapterVersion
from portal.adapters.selectors import adapter_resolve_for_request
from portal.api_keys.models import TenantAPIKey
from tests.portal import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def secret_b(tenant_b, base_model, peft_zip, run_on_commit):
    """Tenant B's ready adapter, its version, and its key."""
    with run_on_commit():
        version = services.adapter_create(
            tenant=tenant_b[0], name="secret-b", base_model=base_model, upload=factories.archive_upload(peft_zip)
        )
    key, _ = factories.api_key_for(tenant_b[0], name="b's key")
    return version, key


def _zip(peft_zip):
    return SimpleUploadedFile("a.zip", peft_zip.read_bytes())


@pytest.fixture(params=["api-key", "session"])
def client_of_a(request, tenant_a):
    if request.param == "api-key":
        _key, secret = factories.api_key_for(tenant_a[0])
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    else:
        client = APIClient()
        client.force_login(tenant_a[1])
    return client


API_ATTEMPTS = [
    ("get", "/api/v1/adapters/secret-b", None),
    ("get", "/api/v1/adapters/secret-b/versions/1", None),
    ("post", "/api/v1/adapters/secret-b/versions", "upload"),
    ("post", "/api/v1/adapters/secret-b/default", {"version": 1}),
    ("delete", "/api/v1/adapters/secret-b", None),
]


@pytest.mark.parametrize(("method", "url", "data"), API_ATTEMPTS, ids=[f"{m} {u}" for m, u, _ in API_ATTEMPTS])
def test_api_attempts_on_another_tenant_are_404(client_of_a, secret_b, method, url, data, peft_zip):
    if data == "upload":
        response = client_of_a.post(url, {"archive": _zip(peft_zip)})
    else:
        response = getattr(client_of_a, method)(url, data, format="json" if data else None)
    assert response.status_code == 404, response.content
    _unchanged(secret_b)


def test_the_list_does_not_show_another_tenants_adapters(client_of_a, secret_b):
    assert client_of_a.get("/api/v1/adapters").json()["count"] == 0


def test_creating_the_same_name_makes_a_separate_adapter(client_of_a, secret_b, peft_zip):
    assert client_of_a.post("/api/v1/adapters", {"name": "secret-b", "archive": _zip(peft_zip)}).status_code == 202
    assert Adapter.objects.filter(name="secret-b").count() == 2
    _unchanged(secret_b)


def test_another_tenants_key_cannot_be_revoked(tenant_a, secret_b):
    client = APIClient()
    client.force_login(tenant_a[1])
    assert client.post(f"/api/v1/keys/{secret_b[1].prefix}/revoke").status_code == 404
    browser = Client()
    browser.force_login(tenant_a[1])
    assert browser.post(f"/keys/{secret_b[1].prefix}/revoke/").status_code == 404
    assert not TenantAPIKey.objects.get(pk=secret_b[1].pk).revoked
    assert secret_b[1].prefix not in browser.get("/keys/").content.decode()


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/adapters/secret-b/"),
        ("get", "/adapters/secret-b/upload/"),
        ("post", "/adapters/secret-b/default/"),
        ("post", "/adapters/secret-b/delete/"),
    ],
)
def test_pages_of_another_tenant_are_404(tenant_a, secret_b, method, url):
    browser = Client()
    browser.force_login(tenant_a[1])
    response = getattr(browser, method)(url, {"version": "1"} if method == "post" else None)
    assert response.status_code == 404
    assert "secret-b" not in browser.get("/adapters/").content.decode()
    _unchanged(secret_b)


def test_another_tenants_adapter_cannot_be_used_for_inference(tenant_a, secret_b):
    for model in ("secret-b", "secret-b@1"):
        with pytest.raises(AdapterRejected) as error:
            adapter_resolve_for_request(tenant=tenant_a[0], model=model)
        assert error.value.code == "not_found"


def _unchanged(secret_b):
    version = AdapterVersion.objects.select_related("adapter").get(pk=secret_b[0].pk)
    assert version.status == "ready" and version.adapter.default_version_id == version.pk
    assert version.adapter.versions.count() == 1
