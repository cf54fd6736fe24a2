from typing import Any

from django.http import HttpRequest

from portal.tenants.errors import TenantError
from portal.tenants.selectors import membership_active_for_user, membership_list_for_user


def active_tenant(request: HttpRequest) -> dict[str, Any]:
    """The header's tenant name and switcher, on every page of a signed-in user."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    try:
        membership = membership_active_for_user(user=user, tenant_id=request.session.get("tenant_id"))
    except TenantError:
        return {"active_membership": None, "memberships": []}
    return {"active_membership": membership, "memberships": list(membership_list_for_user(user=user))}
