from portal.common.errors import ApplicationError


class OpsError(ApplicationError):
    """Refusals of the ops and usage pages: not staff, a bad period."""
