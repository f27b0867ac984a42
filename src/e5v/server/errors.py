"""How ``e5v serve`` answers what went wrong: the error shape, the scheduler's errors, and the last word.

:func:`job_answers` turns the scheduler's refusals and failures into the API's answers, the
same for every route that submits a job.

:class:`LastResort` is the outermost middleware: an exception that escapes every handler
becomes a 500 in the API's error shape (a :class:`~e5v.wire.schema.RequestError` that
escaped, say from a middleware, its own status), logged once with its traceback. The
exception does not reach uvicorn, which would close the connection after Starlette's
plain-text 500: the client's keep-alive connection stays usable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from e5v.errors import E5VError, InvalidInputError, QueueFullError, RequestError, RequestTooLargeError
from e5v.wire.schema import ErrorBody, ErrorResponse, quoted

__all__ = ["LastResort", "error_response", "job_answers"]

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


@contextmanager
def job_answers(
    param: str,
    *,
    invalid: Callable[[InvalidInputError], tuple[str, str]] | None = None,
    too_large: str | None = None,
) -> Iterator[None]:
    """Within the block (a job submitted and awaited), the scheduler's errors as :class:`RequestError`:
    a full queue 429, an invalid item 400, too many pixels 413 and any other failure 500.

    ``param`` is the parameter named by the 400 and the 413; ``invalid`` gives the 400's
    message and parameter instead, ``too_large`` the 413's message (default: the error's own)."""
    try:
        yield
    except RequestError:
        raise
    except QueueFullError as exc:
        raise RequestError(429, str(exc), kind="rate_limit_error") from None
    except InvalidInputError as exc:
        message, named = (str(exc), param) if invalid is None else invalid(exc)
        raise RequestError(400, message, param=named) from None
    except RequestTooLargeError as exc:
        raise RequestError(413, too_large or str(exc), param=param) from None
    except E5VError as exc:
        raise RequestError(500, str(exc), kind="server_error") from None


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
