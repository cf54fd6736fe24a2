from portal.common.errors import ApplicationError


class ApiKeyError(ApplicationError):
    """A key that does not authenticate (malformed, unknown, revoked, expired) or lacks a scope."""
