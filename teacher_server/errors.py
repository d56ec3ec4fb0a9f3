"""Server-side errors, the one table that maps every domain error to its HTTP status, and the
guard that turns an unexpected exception into a JSON 500 without closing the connection."""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import InvalidRequest, MalformedBody, RequestTooLarge, UnsupportedContentType, WireError
from shared.wire import error_body

log = logging.getLogger(__name__)


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


class QueueTimeout(WireError):
    """Queued longer than ``max_queue_wait_s``: answered instead of computed late."""

    error_type = "queue_timeout"


class BodyTimeout(WireError):
    """The body did not arrive within ``body_read_timeout_s``."""

    error_type = "request_timeout"


class ClientGone(WireError):
    """The client disconnected before its answer was ready; nobody reads this status."""

    error_type = "client_gone"


STATUS_BY_ERROR: dict[type[WireError], int] = {
    MalformedBody: 400,
    Unauthorized: 401,
    NotFound: 404,
    BodyTimeout: 408,
    RequestTooLarge: 413,
    UnsupportedContentType: 415,
    InvalidRequest: 422,
    Overloaded: 429,
    ClientGone: 499,  # nginx's "client closed request": it only shows in logs and metrics
    EngineFailure: 500,
    NotReady: 503,
    QueueTimeout: 503,
}


def status_for(error: WireError) -> int:
    """HTTP status of a domain error (500 for anything not in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


class UnexpectedErrorGuard:
    """ASGI middleware: an exception no handler mapped becomes a JSON 500 that names no internals.

    Starlette's own last-resort handler sends its 500 and then re-raises, and uvicorn answers a
    re-raised exception by closing the connection without ``Connection: close``, so a client's next
    request on that keep-alive connection failed. Caught here, the exception stops: the connection
    stays usable and the traceback goes to the log only.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # half a response is out: closing the connection is the only honest end
                raise
            body = error_body("internal_error", "internal server error (logged on the server); retry, and report it if it persists")
            await JSONResponse(body, status_code=500)(scope, receive, send)
