"""Typed errors of the wire contract.

Each error has a stable ``error_type`` string that appears in the JSON error body
``{"error": {"type": ..., "message": ...}}``. The server maps these classes to HTTP status codes in
one place (``teacher_server.errors``); clients raise them when a response cannot be decoded.
"""

from __future__ import annotations


class WireError(Exception):
    """Base class: something about a request or response breaks the wire contract."""

    error_type = "wire_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedBody(WireError):
    """The body cannot be decoded (bad msgpack/JSON, wrong top-level type, broken tensor map)."""

    error_type = "malformed_body"


class InvalidRequest(WireError):
    """The body decodes, but a value is out of range or of the wrong type."""

    error_type = "invalid_request"


class RequestTooLarge(WireError):
    """Too many tokens in one request, or too many bytes in the body."""

    error_type = "request_too_large"


class UnsupportedContentType(WireError):
    """The Content-Type is neither msgpack nor JSON."""

    error_type = "unsupported_content_type"
