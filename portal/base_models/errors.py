from portal.common.errors import ApplicationError


class BaseModelError(ApplicationError):
    """A base model that cannot be registered or used: unknown, or changed under its adapters."""
