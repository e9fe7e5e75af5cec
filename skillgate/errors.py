"""Errors in the Anthropic API's shape, so SDK users see readable messages.

``{"type": "error", "error": {"type": ..., "message": ...}, "request_id": ...}`` with the same
request id in the ``request-id`` header.
"""

from __future__ import annotations

import secrets

import orjson

#: HTTP status → Anthropic error type.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    409: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def new_request_id() -> str:
    """A request id in Anthropic's style (``req_`` + random)."""
    return "req_sg" + secrets.token_hex(12)


def error_type_for(status: int) -> str:
    """The Anthropic error type for an HTTP status."""
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str, request_id: str, error_type: str | None = None) -> bytes:
    """The JSON body of an Anthropic-shaped error."""
    return orjson.dumps(
        {
            "type": "error",
            "error": {"type": error_type or error_type_for(status), "message": message},
            "request_id": request_id,
        }
    )


def sse_error_frame(error_type: str, message: str) -> bytes:
    """An Anthropic ``error`` event in a stream (the SDKs raise it as an ``APIStatusError``)."""
    return b"event: error\ndata: " + error_body(500, message, new_request_id(), error_type) + b"\n\n"


class GatewayError(Exception):
    """An error to return to the caller in the Anthropic shape."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for(status)
        self.headers = headers or {}
