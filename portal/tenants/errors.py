from portal.common.errors import ApplicationError


class TenantError(ApplicationError):
    """A tenancy or permission problem: no tenant, not a member, a role too low, a bad slug."""
