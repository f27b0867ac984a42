"""The last word of ``e5v serve`` on a request that went wrong where no handler expected it.

:class:`LastResort` is the outermost middleware: an exception that escapes every handler
becomes a 500 in the API's error shape (a :class:`~e5v.wire.schema.RequestError` that
escaped, say from a middleware, its own status), logged once with its traceback. The
exception does not reach uvicorn, which would close the connection after Starlette's
plain-text 500: the client's keep-alive connection stays usable.
"""

from __future__ import annotations

import logging

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from e5v.errors import RequestError
from e5v.wire.schema import ErrorBody, ErrorResponse, quoted

__all__ = ["LastResort", "error_response"]

logger = logging.getLogger(__name__)


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error shape (``Retry-After: 1`` with a 429 or a 503)."""
    retry = {"Retry-After": "1"} if status in (429, 503) else {}
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers={**retry, **(headers or {})})


class LastResort:
    """Answer an exception no handler caught: a 500 in the error shape, the traceback logged once.

    If the answer had already begun, nothing can be said any more: the exception goes on to
    the server, which logs it and closes the connection (the client sees a cut answer). If
    it had ended (a background task failed), the failure is logged and the connection kept."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def sending(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except RequestError as exc:
            if started:
                raise
            await error_response(exc.status, exc.message, param=exc.param, kind=exc.kind)(scope, receive, send)
        except Exception:
            if started and not finished:
                raise
            where = f"{scope['method']} {quoted(scope['path'])}"
            if finished:
                logger.exception("an error after answering %s", where)
                return
            logger.exception("an unexpected error answering %s; answered 500", where)
            message = "the server failed unexpectedly while answering; the error is in its log"
            await error_response(500, message, kind="server_error")(scope, receive, send)
