from portal.common.errors import ApplicationError


class AdapterRejected(ApplicationError):
    """The portal refuses an adapter operation: a bad upload, an unknown name, a name taken, a version not ready.

    (An upload whose *content* fails validation is not an exception to the caller: its version
    is marked ``rejected`` with the reason, by the worker.)
    """
