from portal.common.errors import ApplicationError


class UsageError(ApplicationError):
    """A usage query that cannot be answered as asked (bad range, unknown grouping)."""
