"""DRF authentication by tenant API key: ``Authorization: Bearer lf_...``."""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from portal.api_keys.errors import ApiKeyError
from portal.api_keys.models import TenantAPIKey
from portal.api_keys.services import api_key_authenticate, bearer_token


class ApiKeyPrincipal:
    """``request.user`` for a request made with an API key: authenticated, but no person."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False
    pk = None
    id = None

    def __init__(self, key: TenantAPIKey) -> None:
        self.key = key
        self.tenant = key.tenant

    def get_username(self) -> str:
        return f"api-key:{self.key.prefix}"

    def __str__(self) -> str:
        return self.get_username()


class BearerApiKeyAuthentication(BaseAuthentication):
    """Sets ``request.user`` to an ApiKeyPrincipal and ``request.auth`` to the TenantAPIKey.

    Scopes are checked by the view (``access_for_request``), which knows what it needs.
    """

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        raw_key = bearer_token(request.META.get("HTTP_AUTHORIZATION"))
        if raw_key is None:
            return None
        try:
            key, _tenant = api_key_authenticate(raw_key=raw_key)
        except ApiKeyError as exc:
            raise AuthenticationFailed(exc.message) from None
        return ApiKeyPrincipal(key), key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="lorafleet"'
