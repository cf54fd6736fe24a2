import asyncio
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.db import connection
from django.utils import timezone

from portal.api_keys.errors import ApiKeyError
from portal.api_keys.models import TenantAPIKey
from portal.api_keys.services import (
    api_key_authenticate,
    api_key_authenticate_async,
    api_key_authenticate_header,
    api_key_create,
    api_key_revoke,
    bearer_token,
)
from tests.portal import factories

pytestmark = pytest.mark.django_db


def test_a_key_is_shown_once_and_stored_as_a_hash(tenant_a):
    key, secret = api_key_create(tenant=tenant_a[0], name="ci", scopes=["inference"], created_by=tenant_a[1])
    prefix, dot, rest = secret.partition(".")
    assert prefix.startswith("lf_") and len(prefix) == 11 and dot and len(rest) == 32
    assert key.prefix == prefix and key.scopes == ["inference"] and key.created_by == tenant_a[1]
    stored = TenantAPIKey.objects.get(pk=key.pk)
    assert rest not in stored.hashed_key and rest not in stored.id and stored.hashed_key.startswith("sha512$$")


def test_authenticate_returns_the_key_and_its_tenant_and_records_use(tenant_a):
    key, secret = factories.api_key_for(tenant_a[0])
    found, tenant = api_key_authenticate(raw_key=secret, scope="inference")
    assert (found, tenant) == (key, tenant_a[0])
    assert TenantAPIKey.objects.get(pk=key.pk).last_used_at is not None


def test_authenticate_from_the_header(tenant_a):
    key, secret = factories.api_key_for(tenant_a[0])
    assert api_key_authenticate_header(authorization=f"Bearer {secret}")[0] == key
    assert api_key_authenticate_header(authorization=f"bearer   {secret} ")[0] == key
    with pytest.raises(ApiKeyError, match="missing API key") as error:
        api_key_authenticate_header(authorization=None)
    assert error.value.code == "unauthenticated"


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer lf_a.b", "lf_a.b"), ("Api-Key lf_a.b", None), ("Bearer sk-openai", None), ("", None), ("Bearer", None)],
)
def test_bearer_token(header, token):
    assert bearer_token(header) == token


@pytest.mark.parametrize(
    ("mutate", "message", "code"),
    [
        (lambda secret: secret[:-1] + ("x" if secret[-1] != "x" else "y"), "invalid API key", "unauthenticated"),
        (lambda secret: "lf_unknown1.secret", "invalid API key", "unauthenticated"),
        (lambda secret: secret.split(".")[0], "malformed API key", "unauthenticated"),
        (lambda secret: "sk-" + secret, "malformed API key", "unauthenticated"),
    ],
)
def test_wrong_secrets_do_not_authenticate(tenant_a, mutate, message, code):
    _key, secret = factories.api_key_for(tenant_a[0])
    with pytest.raises(ApiKeyError, match=message) as error:
        api_key_authenticate(raw_key=mutate(secret))
    assert error.value.code == code


def test_revoked_expired_suspended_and_unscoped_keys(tenant_a):
    tenant = tenant_a[0]
    revoked, revoked_secret = factories.api_key_for(tenant, name="revoked")
    api_key_revoke(key=revoked)
    api_key_revoke(key=revoked)  # twice is harmless
    with pytest.raises(ApiKeyError, match="was revoked"):
        api_key_authenticate(raw_key=revoked_secret)

    expiring, expiring_secret = api_key_create(
        tenant=tenant, name="short", scopes=["inference"], expires_at=timezone.now() + timedelta(seconds=30)
    )
    TenantAPIKey.objects.filter(pk=expiring.pk).update(expiry_date=timezone.now() - timedelta(seconds=1))
    with pytest.raises(ApiKeyError, match="has expired"):
        api_key_authenticate(raw_key=expiring_secret)

    _key, inference_only = factories.api_key_for(tenant, scopes=["inference"])
    with pytest.raises(ApiKeyError, match="lacks the 'manage' scope") as error:
        api_key_authenticate(raw_key=inference_only, scope="manage")
    assert error.value.code == "forbidden"

    tenant.is_active = False
    tenant.save()
    with pytest.raises(ApiKeyError, match="suspended"):
        api_key_authenticate(raw_key=inference_only)


def test_a_revoked_key_cannot_be_unrevoked(tenant_a):
    key, _ = factories.api_key_for(tenant_a[0])
    api_key_revoke(key=key)
    key = TenantAPIKey.objects.get(pk=key.pk)
    key.revoked = False
    with pytest.raises(ValidationError):
        key.save()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "", "scopes": ["inference"]}, "name of 1 to 50"),
        ({"name": "x" * 51, "scopes": ["inference"]}, "name of 1 to 50"),
        ({"name": "k", "scopes": []}, "non-empty subset"),
        ({"name": "k", "scopes": ["admin"]}, "non-empty subset"),
        ({"name": "k", "scopes": ["inference"], "expires_at": timezone.now() - timedelta(days=1)}, "in the past"),
    ],
)
def test_create_validates(tenant_a, kwargs, message):
    with pytest.raises(ApiKeyError, match=message):
        api_key_create(tenant=tenant_a[0], **kwargs)


@pytest.mark.django_db(transaction=True)
def test_authenticate_from_async_code():
    tenant, _user = factories.tenant_with_member("async-tenant")
    key, secret = factories.api_key_for(tenant)

    async def view():
        try:
            return await api_key_authenticate_async(raw_key=secret, scope="inference")
        finally:  # as Django does at the end of a request, so the test database can be dropped
            await sync_to_async(lambda: connection.close())()

    found, found_tenant = asyncio.run(view())
    assert (found.pk, found_tenant.pk) == (key.pk, tenant.pk)
