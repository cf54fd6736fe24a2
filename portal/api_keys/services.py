from __future__ import annotations

from datetime import datetime, timedelta

from asgiref.sync import sync_to_async
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from portal.api_keys.errors import ApiKeyError
from portal.api_keys.models import KEY_PREFIX, Scope, TenantAPIKey
from portal.common.errors import FORBIDDEN, INVALID, UNAUTHENTICATED
from portal.tenants.models import Tenant

# last_used_at is for people; writing it on every request would make each call a database write.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def api_key_create(
    *,
    tenant: Tenant,
    name: str,
    scopes: list[str],
    expires_at: datetime | None = None,
    created_by: AbstractBaseUser | None = None,
) -> tuple[TenantAPIKey, str]:
    """Returns the key and its secret, which is stored only as a hash: show it once."""
    name = (name or "").strip()
    if not 0 < len(name) <= 50:
        raise ApiKeyError("give the key a name of 1 to 50 characters", code=INVALID)
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown or not scopes:
        raise ApiKeyError(f"scopes must be a non-empty subset of {list(Scope.values)}; got {list(scopes)}", code=INVALID)
    if expires_at is not None and expires_at <= timezone.now():
        raise ApiKeyError("the expiry date is in the past; choose a future date or none", code=INVALID)
    return TenantAPIKey.objects.create_key(
        tenant=tenant,
        name=name,
        scopes=sorted(set(scopes)),
        expiry_date=expires_at,
        created_by=created_by,
    )


@transaction.atomic
def api_key_revoke(*, key: TenantAPIKey) -> TenantAPIKey:
    """Revoking cannot be undone; revoking twice is harmless."""
    key = TenantAPIKey.objects.select_for_update().get(pk=key.pk)
    if not key.revoked:
        key.revoked = True
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked", "revoked_at"])
    return key


def bearer_token(authorization: str | None) -> str | None:
    """The key in ``Authorization: Bearer lf_...``, or None when the header holds no lorafleet key."""
    keyword, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if keyword.lower() != "bearer" or not token.startswith(KEY_PREFIX):
        return None
    return token


def api_key_authenticate(*, raw_key: str, scope: str | None = None) -> tuple[TenantAPIKey, Tenant]:
    """The key and tenant behind a secret; raises ApiKeyError (unauthenticated / forbidden) otherwise.

    Synchronous (it touches the database); from an async view call ``api_key_authenticate_async``.
    """
    prefix, dot, _ = (raw_key or "").partition(".")
    if not prefix.startswith(KEY_PREFIX) or not dot:
        raise ApiKeyError("malformed API key; keys look like lf_XXXXXXXX.<secret>", code=UNAUTHENTICATED)
    key = TenantAPIKey.objects.select_related("tenant").filter(prefix=prefix).first()
    if key is None or not key.is_valid(raw_key):
        raise ApiKeyError("invalid API key", code=UNAUTHENTICATED)
    if key.revoked:
        raise ApiKeyError("this API key was revoked; create a new one", code=UNAUTHENTICATED)
    if key.has_expired:
        raise ApiKeyError("this API key has expired; create a new one", code=UNAUTHENTICATED)
    if not key.tenant.is_active:
        raise ApiKeyError("this tenant is suspended; contact the operator", code=FORBIDDEN)
    if scope is not None and not key.has_scope(scope):
        raise ApiKeyError(
            f"this API key lacks the '{scope}' scope; create a key with it", code=FORBIDDEN
        )
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        TenantAPIKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key, key.tenant


def api_key_authenticate_header(*, authorization: str | None, scope: str | None = None) -> tuple[TenantAPIKey, Tenant]:
    """``api_key_authenticate`` on a raw Authorization header value."""
    raw_key = bearer_token(authorization)
    if raw_key is None:
        raise ApiKeyError(
            "missing API key; send the header 'Authorization: Bearer lf_...'", code=UNAUTHENTICATED
        )
    return api_key_authenticate(raw_key=raw_key, scope=scope)


api_key_authenticate_async = sync_to_async(api_key_authenticate, thread_sensitive=True)
api_key_authenticate_header_async = sync_to_async(api_key_authenticate_header, thread_sensitive=True)
