"""Opt-in fetching of remote images over http(s), with a size cap, a timeout and address rules.

Off by default: ``E5VEmbedder(..., allow_remote=True)`` (or a :class:`RemotePolicy`)
turns it on. Only ``http`` and ``https`` are fetched; redirects are followed only to
``http``/``https`` URLs that pass the same checks; hosts that resolve to private,
loopback, link-local or reserved addresses are refused unless ``allow_private=True``.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from e5v.errors import InvalidInputError

__all__ = ["RemotePolicy", "fetch"]

logger = logging.getLogger(__name__)

_SCHEMES = ("http", "https")
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RemotePolicy:
    """Rules for fetching remote images."""

    max_bytes: int = 32 * 1024 * 1024
    timeout: float = 15.0
    allow_private: bool = False
    max_redirects: int = 3


def _check_url(url: str, policy: RemotePolicy) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in _SCHEMES:
        raise InvalidInputError(f"URL {url!r} has scheme {parts.scheme!r}; only http and https are fetched")
    host = parts.hostname
    if not host:
        raise InvalidInputError(f"URL {url!r} has no host")
    if policy.allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
    except OSError as exc:
        raise InvalidInputError(f"cannot resolve the host of {url!r} ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise InvalidInputError(
                f"URL {url!r} resolves to the non-public address {address}; refused "
                "(pass RemotePolicy(allow_private=True) to fetch from private networks)"
            )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: RemotePolicy) -> None:
        self.policy = policy
        self.count = 0

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        self.count += 1
        if self.count > self.policy.max_redirects:
            raise InvalidInputError(f"more than {self.policy.max_redirects} redirects from {req.full_url!r}")
        _check_url(newurl, self.policy)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch(url: str, policy: RemotePolicy) -> bytes:
    """Download ``url`` under ``policy``; raise :class:`InvalidInputError` on any rule or I/O failure."""
    _check_url(url, policy)
    opener = urllib.request.build_opener(_CheckedRedirects(policy))
    deadline = time.monotonic() + policy.timeout
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "e5v"}), timeout=policy.timeout) as resp:
            declared = resp.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
                raise InvalidInputError(f"{url!r} is {declared} bytes, over the cap of {policy.max_bytes}")
            chunks: list[bytes] = []
            total = 0
            while chunk := resp.read(_CHUNK):
                total += len(chunk)
                if total > policy.max_bytes:
                    raise InvalidInputError(f"{url!r} is over the cap of {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise InvalidInputError(f"{url!r} took longer than {policy.timeout} s")
                chunks.append(chunk)
    except InvalidInputError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot fetch {url!r} ({exc})") from None
    logger.debug("fetched %d bytes from %s", total, url)
    return b"".join(chunks)
