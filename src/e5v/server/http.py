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
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Iterable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from e5v.wire.schema import ErrorBody, ErrorResponse

__all__ = ["LOOPBACK_HOSTS", "CloseOn408", "HostCheck", "allowed_hosts", "bounded_protocol", "host_name", "loopback"]

logger = logging.getLogger(__name__)

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
