"""Remote images: refused by default; when opted in, every rule holds (a local server on 127.0.0.1)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from e5v import InvalidInputError
from e5v.inputs import ImageLoader
from e5v.remote import RemotePolicy

PNG = b""


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        routes = {
            "/cat.png": lambda: self._send(200, PNG, "image/png"),
            "/big": lambda: self._send(200, b"x" * 5000, "image/png"),
            "/stream": self._stream,
            "/slow": self._slow,
            "/to-ftp": lambda: self._redirect("ftp://127.0.0.1/cat.png"),
            "/to-cat": lambda: self._redirect("/cat.png"),
            "/loop": lambda: self._redirect("/loop"),
        }
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


@pytest.fixture(scope="module")
def server(photos) -> Iterator[str]:
    global PNG
    buffer = io.BytesIO()
    photos["cat"].save(buffer, format="PNG")
    PNG = buffer.getvalue()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOCAL = RemotePolicy(allow_private=True, timeout=5.0)


def load(url: str, policy: RemotePolicy | bool) -> object:
    return ImageLoader(allow_remote=policy).load(url, 7)


def test_refused_unless_opted_in(server):
    with pytest.raises(InvalidInputError, match=r"^item 7: .*off by default"):
        load(f"{server}/cat.png", False)


def test_loopback_refused_unless_private_addresses_allowed(server):
    with pytest.raises(InvalidInputError, match=r"^item 7: .*non-public address 127\.0\.0\.1"):
        load(f"{server}/cat.png", True)


def test_fetches_when_allowed_and_embeds_like_the_local_image(server, embedder, photos):
    image = load(f"{server}/cat.png", LOCAL)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(photos["cat"]))
    remote = type(embedder)(embedder.model_name, device="cpu", batch_size=4, allow_remote=LOCAL)
    np.testing.assert_allclose(
        remote.embed_images([f"{server}/cat.png"]), embedder.embed_images([photos["cat"]]), atol=1e-6
    )


def test_size_cap_by_header_and_while_streaming(server):
    small = RemotePolicy(allow_private=True, max_bytes=1000)
    with pytest.raises(InvalidInputError, match="over the cap of 1000"):
        load(f"{server}/big", small)
    with pytest.raises(InvalidInputError, match="over the cap of 1000"):
        load(f"{server}/stream", small)


def test_timeout(server):
    started = time.monotonic()
    with pytest.raises(InvalidInputError, match=r"cannot fetch|took longer"):
        load(f"{server}/slow", RemotePolicy(allow_private=True, timeout=0.5))
    assert time.monotonic() - started < 2.5


def test_redirects_only_to_http_and_bounded(server):
    with pytest.raises(InvalidInputError, match="only http and https"):
        load(f"{server}/to-ftp", LOCAL)
    assert load(f"{server}/to-cat", LOCAL).size == (451, 300)
    with pytest.raises(InvalidInputError, match="redirects"):
        load(f"{server}/loop", LOCAL)
