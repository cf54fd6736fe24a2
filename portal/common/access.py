"""Who is acting, for which tenant, with what rights: one answer for sessions and API keys alike.

Views build an ``Access`` from the request and hand ``access.tenant`` to selectors and services;
every query a tenant can reach is scoped by that tenant inside the selector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import AbstractBaseUser

from portal.api_keys.models import Scope, TenantAPIKey
from portal.common.errors import FORBIDDEN, UNAUTHENTICATED
from portal.tenants.errors import TenantError
from portal.tenants.models import Membership, Tenant, role_at_least
from portal.tenants.selectors import membership_active_for_user

SESSION_TENANT_KEY = "tenant_id"


@dataclass(frozen=True)
class Access:
    tenant: Tenant
    role: str
    user: AbstractBaseUser | None = None  # the person, for a session
    api_key: TenantAPIKey | None = None  # the key, for a Bearer request

    def require_role(self, role: str) -> None:
        if not role_at_least(self.role, role):
            raise TenantError(f"this needs the {role} role in tenant {self.tenant.slug}; you are {self.role}", code=FORBIDDEN)


def access_for_request(request: Any, *, scope: str = Scope.MANAGE) -> Access:
    """The Access of a DRF or Django request. An API key must carry ``scope``; it acts as an admin."""
    key = getattr(request, "auth", None)
    if isinstance(key, TenantAPIKey):
        if not key.has_scope(scope):
            raise TenantError(f"this API key lacks the '{scope}' scope; create a key with it", code=FORBIDDEN)
        return Access(tenant=key.tenant, role=Membership.Role.ADMIN, api_key=key)
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        raise TenantError("sign in, or send 'Authorization: Bearer lf_...'", code=UNAUTHENTICATED)
    membership = membership_active_for_user(user=user, tenant_id=request.session.get(SESSION_TENANT_KEY))
    return Access(tenant=membership.tenant, role=membership.role, user=user)
