"""Server-side errors and the one table that maps every domain error to its HTTP status."""

from __future__ import annotations

from shared.errors import InvalidRequest, MalformedBody, RequestTooLarge, UnsupportedContentType, WireError


class Unauthorized(WireError):
    error_type = "unauthorized"


class Overloaded(WireError):
    error_type = "overloaded"


class NotReady(WireError):
    error_type = "not_ready"


class NotFound(WireError):
    error_type = "not_found"


class EngineFailure(WireError):
    error_type = "engine_failure"


STATUS_BY_ERROR: dict[type[WireError], int] = {
    MalformedBody: 400,
    Unauthorized: 401,
    NotFound: 404,
    RequestTooLarge: 413,
    UnsupportedContentType: 415,
    InvalidRequest: 422,
    Overloaded: 429,
    EngineFailure: 500,
    NotReady: 503,
}


def status_for(error: WireError) -> int:
    """HTTP status of a domain error (500 for anything not in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500
