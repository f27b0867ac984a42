"""The transport of ``e5v serve`` against slow and hostile clients, below the routes.

- :func:`bounded_protocol`: uvicorn's h11 protocol with a header timeout (the request's
  headers must arrive within it of the connection opening or of the previous answer, else
  the connection is closed) and a bound on open connections (a connection over it is
  closed at once, before anything is read).
- :class:`HostCheck`: an ASGI middleware that answers 421 to a ``Host`` header not in
  its list, so a web page cannot reach a keyless loopback server through a rebinding
  domain (:func:`allowed_hosts` says when the check applies).
- :class:`CloseOn408`: an ASGI middleware that closes the connection after a 408, as
  RFC 9110 asks, so a client too slow to send its body does not keep the connection.
- :class:`RequestHeaders`: every answer's ``x-request-id`` (the client's, sanitised, or a
  new one), and on the embedding routes text-embeddings-inference's timing headers
  (:data:`TIMING_HEADERS`), from the :class:`Timing` the route's jobs fill in.
- :class:`AccessLog`: one log line an answered request (static files and thumbnails left out).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from e5v.wire.schema import ErrorBody, ErrorResponse

__all__ = [
    "LOOPBACK_HOSTS",
    "REQUEST_ID_CHARS",
    "TIMED_PATHS",
    "TIMING_HEADERS",
    "AccessLog",
    "CloseOn408",
    "HostCheck",
    "RequestHeaders",
    "Timing",
    "allowed_hosts",
    "bounded_protocol",
    "host_name",
    "loopback",
    "request_id",
    "timing",
]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("e5v.server.access")

#: The host names a loopback server answers to without keys, with any port.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: The most characters of a refused Host header quoted back in the error message.
_QUOTED = 80


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a header timeout and a bound on open connections.

    Configure it with :func:`bounded_protocol`; uvicorn makes one per connection."""

    header_timeout: float = 10.0
    max_connections: int = 1024

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) >= self.max_connections:
            logger.warning("closing a new connection: %d are open, the limit (`max_connections`)", self.max_connections)
            self.transport = transport  # type: ignore[assignment]
            transport.close()
            return
        super().connection_made(transport)  # type: ignore[arg-type]
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers have arrived: it is the app's now
            self._stop_header_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_headers()  # before the base class reads a pipelined request, which stops it
        super().on_response_complete()

    def _await_headers(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            logger.debug("closing a connection: no request headers within %g s (`header_timeout`)", self.header_timeout)
            self.transport.close()


def bounded_protocol(*, header_timeout: float, max_connections: int) -> type[BoundedH11Protocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``: request headers within
    ``header_timeout`` seconds, at most ``max_connections`` connections open."""
    attributes = {"header_timeout": header_timeout, "max_connections": max_connections}
    return type("BoundedH11Protocol", (BoundedH11Protocol,), attributes)


def host_name(host: str) -> str:
    """The name in a ``Host`` header, lower-cased, without its port: ``[::1]:8000`` → ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.partition(":")[0]


def allowed_hosts(bind: str, *, keyed: bool, extra: Iterable[str]) -> list[str] | None:
    """The host names a server bound to ``bind`` answers to, or ``None`` for any.

    Loopback without keys: the loopback names and ``extra``. Elsewhere, or with keys:
    any, unless ``extra`` names hosts (then the loopback names and those)."""
    names = [host_name(host) for host in extra]
    if names or (loopback(bind) and not keyed):
        return [*LOOPBACK_HOSTS, *names]
    return None


def loopback(host: str) -> bool:
    """Whether the bind address ``host`` is an address of this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HostCheck:
    """Answer 421 Misdirected Request, in the API's error shape, to an HTTP request whose
    ``Host`` names none of ``allowed`` (compared without the port), or has no ``Host``."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(host_name(host) for host in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
            if given is None or host_name(given) not in self.allowed:
                quoted = "no Host header" if given is None else f"Host {given[:_QUOTED]!r}"
                message = (
                    f"{quoted} is not a name of this server; it answers to {sorted(self.allowed)} (start it with "
                    "--allowed-hosts NAME to add a name)"
                )
                body = ErrorResponse(error=ErrorBody(message=message, type="invalid_request_error"))
                await JSONResponse(body.model_dump(), status_code=421)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class CloseOn408:
    """Send ``Connection: close`` with every 408 answer, so the server closes the connection
    after it (RFC 9110, 15.5.9) rather than wait for the rest of a slow body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 408:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


#: The most characters of a client's ``x-request-id`` echoed back (the rest is cut).
REQUEST_ID_CHARS = 128
#: Characters of a client's ``x-request-id`` kept; others are dropped.
_UNSAFE_IN_ID = re.compile(r"[^A-Za-z0-9._:/+=@-]")
#: The routes answered with :data:`TIMING_HEADERS` (as text-embeddings-inference's ``/embed``).
TIMED_PATHS = frozenset({"/v1/embeddings", "/v1/search"})
#: The timing headers and what each says: whole milliseconds, and the tokens embedded.
TIMING_HEADERS = {
    "x-total-time": "milliseconds from the request's arrival to its answer",
    "x-queue-time": "milliseconds its items waited for the model (preparing included)",
    "x-inference-time": "milliseconds from the model's first round of its items to its last vector",
    "x-compute-tokens": "prompt tokens embedded for it (image tokens included)",
}
#: The most characters of a path the access log shows.
_LOGGED_PATH = 300
#: Paths the access log leaves out: the page's files, Swagger UI's, thumbnails.
_NOT_LOGGED = re.compile(r"^/static/|^/docs/ui/|^/v1/records/[^/]+/thumbnail$")


def request_id(given: str | None) -> str:
    """The id of a request: the client's ``x-request-id`` with unsafe characters dropped and
    cut to :data:`REQUEST_ID_CHARS`, else (none, or nothing left) a new one."""
    kept = _UNSAFE_IN_ID.sub("", given or "")[:REQUEST_ID_CHARS]
    return kept or uuid.uuid4().hex


@dataclass
class Timing:
    """What answering one request on a :data:`TIMED_PATHS` route took: filled in by each job
    it embedded (:meth:`add`), read when its answer starts."""

    started: float
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    tokens: int = 0
    embedded: bool = False

    def add(self, queue_seconds: float, inference_seconds: float, tokens: int) -> None:
        """Count one embedded job of the request."""
        self.queue_seconds += queue_seconds
        self.inference_seconds += inference_seconds
        self.tokens += tokens
        self.embedded = True

    def headers(self) -> list[tuple[bytes, bytes]]:
        """:data:`TIMING_HEADERS`, the compute ones only if something was embedded."""
        values = {"x-total-time": _ms(time.perf_counter() - self.started)}
        if self.embedded:
            values["x-queue-time"] = _ms(self.queue_seconds)
            values["x-inference-time"] = _ms(self.inference_seconds)
            values["x-compute-tokens"] = str(self.tokens)
        return [(name.encode(), value.encode()) for name, value in values.items()]


_TIMING: ContextVar[Timing | None] = ContextVar("e5v_request_timing", default=None)


def timing() -> Timing | None:
    """The :class:`Timing` of the request answered in this context, if its route is timed."""
    return _TIMING.get()


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


def _header(scope: Scope, name: bytes) -> str | None:
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), None)


class RequestHeaders:
    """Send ``x-request-id`` with every answer, and the :class:`Timing` headers with those of
    :data:`TIMED_PATHS` (the route's jobs reach the timing through :func:`timing`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        identifier = request_id(_header(scope, b"x-request-id")).encode()
        timed = Timing(time.perf_counter()) if scope["path"] in TIMED_PATHS else None

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                added = [(b"x-request-id", identifier), *([] if timed is None else timed.headers())]
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        token = _TIMING.set(timed)
        try:
            await self.app(scope, receive, sending)
        finally:
            _TIMING.reset(token)


class AccessLog:
    """Log each answered request on ``e5v.server.access``: client, method, path, status,
    milliseconds and request id; the page's static files, Swagger UI's and thumbnails are
    left out (a page load would log dozens of lines)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _NOT_LOGGED.search(scope["path"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, identifier = 0, "-"

        async def sending(message: Message) -> None:
            nonlocal status, identifier
            if message["type"] == "http.response.start":
                status = message["status"]
                found = (value for name, value in message.get("headers", []) if name == b"x-request-id")
                identifier = next(found, b"-").decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            client = scope.get("client")
            where = "-" if not client else f"{client[0]}:{client[1]}"
            query = scope.get("query_string", b"").decode("latin-1")
            path = scope["path"] + (f"?{query}" if query else "")
            access_logger.info(
                '%s "%s %s" %s %.1f ms id=%s',
                where,
                scope["method"],
                repr(path[:_LOGGED_PATH])[1:-1],  # control characters escaped: one line, always
                status or "-",
                (time.perf_counter() - started) * 1000,
                identifier,
            )
