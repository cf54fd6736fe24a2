"""The one place where the portal's errors become HTTP responses.

Each app raises its own error type (``TenantError``, ``BaseModelError``, ``AdapterRejected``,
``ApiKeyError``), all subclasses of ``ApplicationError``. An error carries a message that names
the fix and a ``code`` from the small vocabulary below; the code alone decides the HTTP status,
here, for the REST API (DRF style ``{"detail", "code"}``) and for the HTML pages alike.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.utils.http import url_has_allowed_host_and_scheme

INVALID = "invalid"
UNAUTHENTICATED = "unauthenticated"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
CONFLICT = "conflict"
NOT_READY = "not_ready"
TOO_LARGE = "too_large"
QUOTA_EXCEEDED = "quota_exceeded"
UNAVAILABLE = "unavailable"

HTTP_STATUS: dict[str, int] = {
    INVALID: 400,
    UNAUTHENTICATED: 401,
    FORBIDDEN: 403,
    NOT_FOUND: 404,
    CONFLICT: 409,
    NOT_READY: 409,
    TOO_LARGE: 413,
    # A tenant's limit (storage, adapters, versions): allowed for this caller, refused until something is
    # deleted or an operator raises it. Not 413, whose fix is a smaller request, nor 429, which passes by waiting.
    QUOTA_EXCEEDED: 403,
    UNAVAILABLE: 503,
}


class ApplicationError(Exception):
    """An error a user can cause; ``message`` says what to do about it."""

    default_code = INVALID

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        if self.code not in HTTP_STATUS:
            raise ValueError(f"unknown error code {self.code!r}")

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Any:
    # Imported here: DRF's settings import the authentication classes, which import this module.
    from django.db import DataError
    from rest_framework.response import Response
    from rest_framework.views import exception_handler

    if isinstance(exc, ApplicationError):
        return Response({"detail": exc.message, "code": exc.code}, status=exc.http_status)
    if isinstance(exc, DataError):  # e.g. a NUL byte in a path or query value, which PostgreSQL text refuses
        return Response({"detail": "a value in the request holds a NUL byte or is out of the database's range; "
                                   "send printable text", "code": INVALID}, status=400)
    return exception_handler(exc, context)


class ApplicationErrorMiddleware:
    """HTML pages: a failed form post goes back where it came from with the message; the rest render it."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        from django.db import DataError

        if isinstance(exc, DataError):  # a NUL byte in a path or form value: the user's input, not our fault
            exc = ApplicationError("a value in the request holds a NUL byte or is out of range; send printable text")
        if not isinstance(exc, ApplicationError):
            return None
        referer = request.META.get("HTTP_REFERER", "")
        same_site = url_has_allowed_host_and_scheme(
            referer, allowed_hosts={request.get_host()}, require_https=request.is_secure()
        )
        if request.method == "POST" and exc.code != NOT_FOUND and referer and same_site:
            messages.error(request, exc.message)
            return HttpResponseRedirect(referer)
        return render(request, "error.html", {"error": exc}, status=exc.http_status)
