"""Opt-in fetching of remote images over http(s), with a size cap, a total deadline and address rules.

Off by default: ``E5VEmbedder(..., allow_remote=True)`` (or a :class:`RemotePolicy`) turns it on.
Only ``http`` and ``https`` are fetched; redirects are followed only to ``http``/``https`` URLs, at
most ``max_redirects`` of them, each checked like the first.

How the address rule holds against DNS rebinding: the fetch runs on an httpcore connection pool
(httpx's own engine; httpx's transport does not take a network backend, httpcore's pool does,
publicly) with URLs parsed and joined by httpx. The pool's network backend resolves the host once
per connection, refuses the connection if any address is not public (unless
``allow_private=True``) and connects to exactly the address it checked. The request still names the
host, so the ``Host`` header, TLS SNI and certificate verification all use the URL's host name.
No proxy is used: a proxy would resolve the name itself and the check would not hold.

How the deadline holds: the same backend gives every network step (the lookup, the connection, the
TLS handshake, each read and write) only the time left before ``timeout``, so the whole fetch,
redirects, headers and body included, ends by then however slowly a server sends.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from e5v.errors import ConfigurationError, InvalidInputError

__all__ = ["RemotePolicy", "fetch"]

logger = logging.getLogger(__name__)

_SCHEMES = ("http", "https")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SHOWN = 100  # characters of a URL quoted in a message


@dataclass(frozen=True)
class RemotePolicy:
    """Rules for fetching remote images.

    ``max_bytes``: the largest body fetched (by ``Content-Length`` and while reading); ``timeout``:
    seconds for the whole fetch, redirects included; ``allow_private``: also fetch from private,
    loopback, link-local and reserved addresses; ``max_redirects``: redirects followed.
    """

    max_bytes: int = 32 * 1024 * 1024
    timeout: float = 15.0
    allow_private: bool = False
    max_redirects: int = 3

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ConfigurationError(f"RemotePolicy.max_bytes must be at least 1, got {self.max_bytes}")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigurationError(f"RemotePolicy.timeout must be a positive number of seconds, got {self.timeout}")
        if self.max_redirects < 0:
            raise ConfigurationError(f"RemotePolicy.max_redirects must be 0 or more, got {self.max_redirects}")


class _Refused(Exception):
    """A connection the policy does not allow; the message completes "URL '...' ..."."""


class _OutOfTime(Exception):
    """The fetch's deadline passed."""


class _Deadline:
    """The time left of one fetch."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def left(self, timeout: float | None = None) -> float:
        """Seconds left (no more than ``timeout``); raise :class:`_OutOfTime` when none are."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise _OutOfTime
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation ends by the deadline."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._deadline.left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._deadline.left(timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        # CPython bounds the whole handshake by the socket's timeout, so a trickling server cannot stretch it.
        stream = self._stream.start_tls(ssl_context, server_hostname, self._deadline.left(timeout))
        return _DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _CheckedBackend(httpcore.SyncBackend):
    """Resolves a host once, checks every address, connects to a checked one, all within the deadline."""

    def __init__(self, policy: RemotePolicy, deadline: _Deadline) -> None:
        self._policy = policy
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = _resolve(host, port, self._deadline)
        if not self._policy.allow_private:
            for address in addresses:
                if not _is_public(address):
                    raise _Refused(
                        f"resolves to the non-public address {address}; refused "
                        "(pass RemotePolicy(allow_private=True) to fetch from private networks)"
                    )
        # Each is a literal address, so connecting to it looks nothing up; a refused or unreachable one
        # gives way to the next checked address.
        for address in addresses[:-1]:
            try:
                return self._connect(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError:
                continue
        return self._connect(addresses[-1], port, timeout, local_address, socket_options)

    def _connect(
        self,
        address: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        timeout: float | None,
        local_address: str | None,
        socket_options: Iterable[Any] | None,
    ) -> httpcore.NetworkStream:
        stream = super().connect_tcp(str(address), port, self._deadline.left(timeout), local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)


def _resolve(host: str, port: int, deadline: _Deadline) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of ``host``, looked up once; the lookup runs on a helper thread so the deadline bounds it."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    answer: list[list[Any] | OSError | UnicodeError] = []

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)

    thread = threading.Thread(target=lookup, name="e5v-remote-lookup", daemon=True)
    thread.start()
    thread.join(deadline.left())
    if not answer:
        raise _OutOfTime
    if isinstance(answer[0], (OSError, UnicodeError)):
        raise _Refused(f"has a host that cannot be resolved ({answer[0]})")
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0]) for info in answer[0]))
    if not addresses:
        raise _Refused("has a host that resolves to no address")
    return addresses


def _is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def _tls_context() -> ssl.SSLContext:
    return _tls_context_for(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.lru_cache(maxsize=4)
def _tls_context_for(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """httpx's verifying context, built once per value of the variables it reads (``cafile``, ``capath``)."""
    return httpx.create_ssl_context()


def _shown(url: str) -> str:
    return repr(url if len(url) <= _SHOWN else url[: _SHOWN - 3] + "...")


def fetch(url: str, policy: RemotePolicy) -> bytes:
    """Download ``url`` under ``policy``; raise :class:`InvalidInputError` on any rule or I/O failure."""
    backend = _CheckedBackend(policy, _Deadline(policy.timeout))
    where = _shown(url)  # the URL being fetched, as messages quote it
    target = _parse(url, where)
    with httpcore.ConnectionPool(ssl_context=_tls_context(), network_backend=backend) as pool:
        for redirects in range(policy.max_redirects + 1):
            location, data = _get(pool, target, where, policy)
            if location is None:
                logger.debug("fetched %d bytes from %s", len(data), where)
                return data
            if redirects == policy.max_redirects:
                break
            try:
                joined = str(target.join(location))
            except httpx.InvalidURL as exc:
                raise InvalidInputError(f"{where} redirects to an invalid URL ({exc})") from None
            where = f"{_shown(joined)} (a redirect from {_shown(url)})"
            target = _parse(joined, where)
    raise InvalidInputError(
        f"{_shown(url)} redirects more than {policy.max_redirects} times; refused "
        "(RemotePolicy.max_redirects bounds them)"
    )


def _get(
    pool: httpcore.ConnectionPool, target: httpx.URL, where: str, policy: RemotePolicy
) -> tuple[str | None, bytes]:
    """One request: a redirect's ``Location`` and no body, or ``None`` and the body of a final answer."""
    url = httpcore.URL(scheme=target.raw_scheme, host=target.raw_host, port=target.port, target=target.raw_path)
    headers = [(b"Host", target.netloc), (b"User-Agent", b"e5v"), (b"Accept-Encoding", b"identity")]
    # Each step's timeout; the backend cuts every one to the time left.
    timeouts = dict.fromkeys(("connect", "read", "write", "pool"), policy.timeout)
    try:
        with pool.stream("GET", url, headers=headers, extensions={"timeout": timeouts}) as response:
            answer = httpx.Headers(response.headers)
            if response.status not in _REDIRECTS:
                return None, _body(response, answer, where, policy.max_bytes)
            location = answer.get("Location")
            if not location:
                raise InvalidInputError(f"{where} answered HTTP {response.status} without a Location to follow")
            return location, b""
    except _Refused as exc:
        raise InvalidInputError(f"URL {where} {exc}") from None
    except (_OutOfTime, httpcore.TimeoutException):
        raise InvalidInputError(
            f"fetching {where} took longer than {policy.timeout:g} s (RemotePolicy.timeout); "
            "the server is too slow or the image too large"
        ) from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise InvalidInputError(f"cannot fetch {where} ({detail[:200]})") from None


def _parse(url: str, where: str) -> httpx.URL:
    """``url`` parsed, if it is an http(s) URL with a host."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise InvalidInputError(f"URL {where} is not a valid URL ({exc})") from None
    if parsed.scheme not in _SCHEMES:
        raise InvalidInputError(f"URL {where} has scheme {parsed.scheme!r}; only http and https are fetched")
    if not parsed.host:
        raise InvalidInputError(f"URL {where} has no host")
    return parsed


def _body(response: httpcore.Response, headers: httpx.Headers, where: str, max_bytes: int) -> bytes:
    """The body of a final answer, read up to ``max_bytes``."""
    if not 200 <= response.status < 300:
        raise InvalidInputError(f"cannot fetch {where}: the server answered HTTP {response.status}")
    declared = headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidInputError(f"{where} is {declared} bytes, over the cap of {max_bytes} (RemotePolicy.max_bytes)")
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_stream():
        total += len(chunk)
        if total > max_bytes:
            raise InvalidInputError(f"{where} is over the cap of {max_bytes} bytes (RemotePolicy.max_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)
