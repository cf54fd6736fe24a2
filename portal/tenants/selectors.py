from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser
from django.db.models import QuerySet

from portal.common.errors import FORBIDDEN
from portal.tenants.errors import TenantError
from portal.tenants.models import Membership


def membership_list_for_user(*, user: AbstractBaseUser) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__slug")


def membership_active_for_user(*, user: AbstractBaseUser, tenant_id: int | None = None) -> Membership:
    """The tenant a signed-in user acts for: the one chosen in their session, else their first."""
    memberships = membership_list_for_user(user=user)
    chosen = memberships.filter(tenant_id=tenant_id).first() if tenant_id is not None else None
    membership = chosen or memberships.first()
    if membership is None:
        raise TenantError(
            "your account belongs to no tenant; ask a tenant owner or an operator to add you "
            "(python manage.py create_tenant <slug> --owner <username>)",
            code=FORBIDDEN,
        )
    return membership
