from __future__ import annotations

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import transaction

from portal.common.errors import CONFLICT, INVALID
from portal.tenants.errors import TenantError
from portal.tenants.models import Membership, Tenant, slug_validator


def tenant_create(*, slug: str, name: str = "") -> Tenant:
    try:
        slug_validator(slug)
    except ValidationError:
        raise TenantError(
            f"tenant slug {slug!r} is not valid: use lowercase letters, digits and inner hyphens", code=INVALID
        ) from None
    if Tenant.objects.filter(slug=slug).exists():
        raise TenantError(f"tenant {slug!r} already exists", code=CONFLICT)
    return Tenant.objects.create(slug=slug, name=name or slug)


def tenant_member_set(*, tenant: Tenant, user: AbstractBaseUser, role: str) -> Membership:
    """Add a user to a tenant, or change the role they have there."""
    membership, _ = Membership.objects.update_or_create(tenant=tenant, user=user, defaults={"role": role})
    return membership


@transaction.atomic
def tenant_bootstrap(
    *, slug: str, owner_username: str, password: str | None = None, name: str = ""
) -> tuple[Tenant, bool]:
    """Create (or complete) a tenant with an owner; running it twice changes nothing but the password.

    Returns the tenant and whether it was created now.
    """
    tenant = Tenant.objects.filter(slug=slug).first()
    created = tenant is None
    if tenant is None:
        tenant = tenant_create(slug=slug, name=name)
    user_model = get_user_model()
    user = user_model.objects.filter(username=owner_username).first()
    if user is None:
        user = user_model(username=owner_username)
        user.set_unusable_password()
    if password:
        user.set_password(password)
    user.save()
    tenant_member_set(tenant=tenant, user=user, role=Membership.Role.OWNER)
    return tenant, created
