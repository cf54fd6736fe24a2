"""The /v1 API's one error type, and the one place where errors become OpenAI-shaped responses.

Every failure on /v1 answers ``{"error": {"message", "type", "param", "code"}}`` with the status
that its ``code`` maps to below. Errors raised by the other apps' services (a key that does not
authenticate, a model that does not resolve) are translated here too, so a view never builds an
error response itself.
"""

from __future__ import annotations

import math

from django.http import JsonResponse

from portal.common.errors import ApplicationError

# code → (HTTP status, OpenAI error type)
ERRORS: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "invalid_request_error"),
    "invalid_value": (400, "invalid_request_error"),
    "missing_required_parameter": (400, "invalid_request_error"),
    "unsupported_parameter": (400, "invalid_request_error"),
    "context_length_exceeded": (400, "invalid_request_error"),
    "invalid_request": (400, "invalid_request_error"),  # the engine refused the request's content
    "invalid_api_key": (401, "authentication_error"),
    "permission_denied": (403, "permission_error"),
    "model_not_found": (404, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "model_not_ready": (409, "invalid_request_error"),
    "request_too_large": (413, "invalid_request_error"),
    "rate_limit_exceeded": (429, "rate_limit_error"),  # a key's or its tenant's requests or tokens per minute
    "too_many_requests_in_flight": (429, "rate_limit_error"),  # the tenant's cap on queued + running requests
    "engine_error": (500, "server_error"),
    "too_many_deliveries": (500, "server_error"),
    "engine_unavailable": (503, "server_error"),  # no live engine serves the base model
    "adapter_unavailable": (503, "server_error"),  # the engine could not load a staged adapter
    "deadline_exceeded": (504, "timeout"),
}

# What the other apps' ApplicationError codes mean on /v1.
_APPLICATION_CODES = {
    "unauthenticated": "invalid_api_key",
    "forbidden": "permission_denied",
    "not_found": "model_not_found",
    "not_ready": "model_not_ready",
    "invalid": "invalid_value",
    "conflict": "invalid_value",
    "too_large": "request_too_large",
    "unavailable": "engine_unavailable",
}


class InferenceError(Exception):
    """A request /v1 refuses or could not serve; ``message`` says what to do about it."""

    def __init__(self, message: str, *, code: str, param: str | None = None, retry_after: float | None = None) -> None:
        if code not in ERRORS:
            raise ValueError(f"unknown inference error code {code!r}")
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return ERRORS[self.code][0]

    @property
    def type(self) -> str:
        return ERRORS[self.code][1]

    @classmethod
    def from_application_error(cls, exc: ApplicationError, *, param: str | None = None) -> InferenceError:
        return cls(exc.message, code=_APPLICATION_CODES.get(exc.code, "invalid_value"), param=param)

    @classmethod
    def from_engine(cls, code: str, message: str, *, prompt_param: str = "messages") -> InferenceError:
        """An ``ErrorEvent`` from the engine daemon; a code this table does not know is the engine's fault."""
        if code not in ERRORS:
            return cls(f"the engine failed ({code}): {message}", code="engine_error")
        return cls(message, code=code, param=prompt_param if code == "context_length_exceeded" else None)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(exc: InferenceError) -> JsonResponse:
    response = JsonResponse(exc.body(), status=exc.status)
    if exc.retry_after is not None:
        response["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return response
