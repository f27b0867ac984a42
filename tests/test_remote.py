"""Remote images: refused by default; when opted in, every rule holds (local servers on 127.0.0.1).

DNS cannot run here, so tests that need a host name replace ``socket.getaddrinfo`` for names ending
in ``.test`` (everything else still resolves for real); the sockets, servers and TLS are real.
"""

from __future__ import annotations

import io
import ipaddress
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from e5v import InvalidInputError
from e5v.core import remote
from e5v.core.inputs import ImageLoader
from e5v.core.remote import RemotePolicy, fetch
from e5v.errors import ConfigurationError

PNG = b""
TRICKLE_STEPS = 40  # one byte every 0.5 s: 20 s at most, far past the timeouts used below


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes: dict[str, Callable[[], None]] = {
            "/cat.png": lambda: self._send(200, PNG, "image/png"),
            "/host": lambda: self._send(200, self.headers["Host"].encode(), "text/plain"),
            "/big": lambda: self._send(200, b"x" * 5000, "image/png"),
            "/stream": self._stream,
            "/slow": self._slow,
            "/trickle-body": self._trickle_body,
            "/trickle-headers": self._trickle_headers,
            "/to-ftp": lambda: self._redirect("ftp://127.0.0.1/cat.png"),
            "/to-cat": lambda: self._redirect("/cat.png"),
            "/to-private": lambda: self._redirect(f"http://127.0.0.3:{port}/cat.png"),
            "/loop": lambda: self._redirect("/loop"),
        }
        routes.update({f"/chain/{n}": lambda n=n: self._redirect(f"/chain/{n - 1}") for n in range(1, 6)})
        routes["/chain/0"] = routes["/cat.png"]
        routes.get(self.path, lambda: self._send(404, b"no", "text/plain"))()

    def _send(self, code: int, body: bytes, kind: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self) -> None:  # no Content-Length: the cap must hold while reading
        self.send_response(200)
        self.end_headers()
        for _ in range(20):
            self.wfile.write(b"y" * 1000)

    def _slow(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()
        time.sleep(3)
        self.wfile.write(b"z" * 10)

    def _trickle_body(self) -> None:  # every read returns soon, the body never ends in time
        self.send_response(200)
        self.send_header("Content-Length", str(TRICKLE_STEPS))
        self.end_headers()
        self._trickle(b"z" * TRICKLE_STEPS)

    def _trickle_headers(self) -> None:  # the headers themselves never end in time
        self._trickle(b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * TRICKLE_STEPS + b"\r\n\r\n")

    def _trickle(self, data: bytes) -> None:
        for index in range(min(len(data), TRICKLE_STEPS)):
            try:
                self.wfile.write(data[index : index + 1])
                self.wfile.flush()
            except OSError:  # the client gave up
                return
            time.sleep(0.5)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up on a refused body is fine
            super().handle_error(request, client_address)


@contextmanager
def serve(context: ssl.SSLContext | None = None) -> Iterator[int]:
    """A test server on 127.0.0.1 (TLS with ``context``); yields its port."""
    httpd = Server(("127.0.0.1", 0), Handler)
    if context is not None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def port(photos) -> Iterator[int]:
    global PNG
    buffer = io.BytesIO()
    photos["cat"].save(buffer, format="PNG")
    PNG = buffer.getvalue()
    with serve() as number:
        yield number


@pytest.fixture(scope="module")
def server(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@dataclass
class Resolver:
    """Answers for ``*.test`` names: each lookup takes the next answer (the last one repeats); an answer
    of several addresses separates them by spaces."""

    answers: dict[str, list[str]] = field(default_factory=dict)
    delay: float = 0.0
    lookups: list[str] = field(default_factory=list)


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    fake = Resolver()
    real = socket.getaddrinfo

    def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> list:
        if not (isinstance(host, str) and host.endswith(".test")):
            return real(host, port, *args, **kwargs)
        fake.lookups.append(host)
        time.sleep(fake.delay)
        queue = fake.answers.get(host)
        if not queue:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (a, port)) for a in answer.split()]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return fake


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 stands in for an image host's public address (no public address can be served here)."""
    real = remote._is_public
    monkeypatch.setattr(
        remote, "_is_public", lambda address: address == ipaddress.ip_address("127.0.0.1") or real(address)
    )


LOCAL = RemotePolicy(allow_private=True, timeout=5.0)


def load(url: str, policy: RemotePolicy | bool) -> object:
    return ImageLoader(allow_remote=policy).load(url, 7)


def test_refused_unless_opted_in(server):
    with pytest.raises(InvalidInputError, match=r"^item 7: .*off by default"):
        load(f"{server}/cat.png", False)


def test_loopback_refused_unless_private_addresses_allowed(server, port, resolver):
    with pytest.raises(InvalidInputError, match=r"^item 7: .*non-public address 127\.0\.0\.1"):
        load(f"{server}/cat.png", True)
    resolver.answers["img.test"] = ["127.0.0.1"]
    with pytest.raises(InvalidInputError, match=r"URL 'http://img\.test:\d+/cat\.png' resolves to the non-public"):
        fetch(f"http://img.test:{port}/cat.png", RemotePolicy())


def test_fetches_when_allowed_and_embeds_like_the_local_image(server, embedder, photos):
    assert fetch(f"{server}/cat.png", LOCAL) == PNG
    image = load(f"{server}/cat.png", LOCAL)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(photos["cat"]))
    remote_embedder = type(embedder)(embedder.model_name, device="cpu", batch_size=4, allow_remote=LOCAL)
    np.testing.assert_allclose(
        remote_embedder.embed_images([f"{server}/cat.png"]), embedder.embed_images([photos["cat"]]), atol=1e-6
    )


def test_one_lookup_and_the_connection_goes_to_the_checked_address(port, resolver, loopback_is_public):
    # A rebinding name: the first answer is "public" (and serves), every later one is private.
    resolver.answers["rebind.test"] = ["127.0.0.1", "127.0.0.3"]
    assert fetch(f"http://rebind.test:{port}/host", RemotePolicy(timeout=5.0)) == f"rebind.test:{port}".encode()
    assert resolver.lookups == ["rebind.test"]


def test_an_address_that_refuses_gives_way_to_the_next_checked_one(port, resolver):
    resolver.answers["two.test"] = ["127.0.0.3 127.0.0.1", "127.0.0.4"]  # nothing listens on 127.0.0.3
    assert fetch(f"http://two.test:{port}/host", LOCAL) == f"two.test:{port}".encode()
    assert resolver.lookups == ["two.test"]


def test_a_redirect_to_a_private_address_is_refused(port, resolver, loopback_is_public):
    resolver.answers["img.test"] = ["127.0.0.1"]
    assert fetch(f"http://img.test:{port}/to-cat", RemotePolicy(timeout=5.0)) == PNG
    with pytest.raises(InvalidInputError, match=r"127\.0\.0\.3.*a redirect from .*non-public address 127\.0\.0\.3"):
        fetch(f"http://img.test:{port}/to-private", RemotePolicy(timeout=5.0))


def test_size_cap_by_header_and_while_streaming(server):
    small = RemotePolicy(allow_private=True, max_bytes=1000)
    with pytest.raises(InvalidInputError, match="over the cap of 1000"):
        load(f"{server}/big", small)
    with pytest.raises(InvalidInputError, match="over the cap of 1000"):
        load(f"{server}/stream", small)


def test_timeout(server):
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match=r"took longer than 0\.5 s"):
        load(f"{server}/slow", RemotePolicy(allow_private=True, timeout=0.5))
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_trickling_server_is_cut_off_at_the_total_deadline(server, path):
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match=r"took longer than 2 s \(RemotePolicy\.timeout\)"):
        fetch(f"{server}{path}", RemotePolicy(allow_private=True, timeout=2.0))
    assert time.monotonic() - started < 4.5


def test_the_deadline_bounds_the_lookup(port, resolver):
    resolver.answers["slow-dns.test"] = ["127.0.0.1"]
    resolver.delay = 3.0
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match="took longer than 1 s"):
        fetch(f"http://slow-dns.test:{port}/cat.png", RemotePolicy(allow_private=True, timeout=1.0))
    assert time.monotonic() - started < 2.5


def test_unresolvable_hosts_and_error_statuses_are_clear(port, resolver):
    with pytest.raises(InvalidInputError, match=r"'http://nowhere\.test/a\.png' has a host that cannot be resolved"):
        fetch("http://nowhere.test/a.png", LOCAL)
    with pytest.raises(InvalidInputError, match=r"cannot fetch .*/missing': the server answered HTTP 404"):
        fetch(f"http://127.0.0.1:{port}/missing", LOCAL)
    with pytest.raises(
        InvalidInputError, match=r"^URL 'http://127\.0\.0\.1:\d+/x{50,}\.\.\.' resolves to the non-public"
    ):
        fetch(f"http://127.0.0.1:{port}/{'x' * 10_000}", RemotePolicy())  # quoted cut short


def test_redirects_only_to_http_and_bounded(server):
    with pytest.raises(InvalidInputError, match="only http and https"):
        load(f"{server}/to-ftp", LOCAL)
    assert load(f"{server}/to-cat", LOCAL).size == (451, 300)
    with pytest.raises(InvalidInputError, match="redirects more than 3 times"):
        load(f"{server}/loop", LOCAL)
    assert fetch(f"{server}/chain/3", LOCAL) == PNG
    with pytest.raises(InvalidInputError, match="redirects more than 3 times"):
        fetch(f"{server}/chain/4", LOCAL)
    with pytest.raises(InvalidInputError, match="redirects more than 0 times"):
        fetch(f"{server}/to-cat", RemotePolicy(allow_private=True, max_redirects=0))


@pytest.mark.parametrize(
    ("option", "value"), [("max_bytes", 0), ("timeout", 0.0), ("timeout", float("inf")), ("max_redirects", -1)]
)
def test_policy_limits_are_checked(option, value):
    with pytest.raises(ConfigurationError, match=f"RemotePolicy.{option}"):
        RemotePolicy(**{option: value})


def _certificates(root: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for ``img.test`` signed by it, made with the openssl CLI."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True, timeout=60)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    ca_extensions = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    run("req", "-x509", *key, *ca_extensions, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=e5v test CA")
    run("req", *key, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=img.test")
    (root / "leaf.ext").write_text(
        "subjectAltName=DNS:img.test\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    signing = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-extfile", "leaf.ext"]
    run("x509", "-req", "-in", "leaf.csr", *signing, "-out", "leaf.pem")
    return root / "ca.pem", root / "leaf.pem", root / "leaf.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_https_verifies_the_host_name_while_connecting_to_the_checked_address(port, tmp_path, resolver, monkeypatch):
    ca, cert, key = _certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    resolver.answers.update({"img.test": ["127.0.0.1", "127.0.0.3"], "other.test": ["127.0.0.1"]})
    with serve(context) as tls_port:
        assert fetch(f"https://img.test:{tls_port}/host", LOCAL) == f"img.test:{tls_port}".encode()
        assert resolver.lookups == ["img.test"]
        with pytest.raises(InvalidInputError, match=r"cannot fetch 'https://other\.test.*certificate"):
            fetch(f"https://other.test:{tls_port}/host", LOCAL)  # served with img.test's certificate
