"""``RemoteEmbedder`` against a faulty server: a loopback stub that answers ``/info`` well and
``/v1/embeddings`` short, with wrong rows, HTML, cut off, ``Retry-After: 86400`` or one byte a
second. Every call fails with an e5v error, within its timeout, saying what the server sent;
and against the real ``e5v serve``, the async calls give the sync calls' vectors."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import struct
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving import KEY, free_port, start_server, stop

from e5v import Composed, EmbeddingError, Interleaved, InvalidInputError, RemoteEmbedder
from e5v.client import MAX_RETRY_AFTER
from e5v.errors import ConfigurationError, E5VError

DIMENSION = 4
#: Seconds a timed call may run past its timeout before the test calls it a hang (a shared, loaded machine).
MARGIN = 3.0


def vector(index: int) -> list[float]:
    return [float(index), 1.0, 2.0, 3.0]


def row(index: int, values: list[float] | None = None) -> dict[str, Any]:
    packed = struct.pack(f"<{DIMENSION if values is None else len(values)}f", *(values or vector(index)))
    return {"object": "embedding", "index": index, "embedding": base64.b64encode(packed).decode()}


def answer(rows: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"object": "list", "data": rows, "model": "stub", "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    ).encode()


HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1>nginx</body></html>"


class Stub(ThreadingHTTPServer):
    """A loopback HTTP/1.1 server whose first path segment names its fault; it counts its connections."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.accepted = 0
        self.open = 0
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Stub

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.accepted += 1
            self.server.open += 1

    def finish(self) -> None:
        with self.server.lock:
            self.server.open -= 1
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.endswith("/info"):
            info = {"model": "stub", "ready": True, "dimension": DIMENSION, "max_batch_size": 8}
            self.send(200, json.dumps({**info, "max_client_batch_size": 8}).encode())
        else:
            self.send(404, b'{"error": {"message": "no such page", "type": "not_found"}}')

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        count = len(body["input"])
        fault = self.path.split("/")[1]
        with self.server.lock:
            calls = self.server.calls[fault] = self.server.calls.get(fault, 0) + 1
        rows = [row(i) for i in range(count)]
        if fault == "ok":
            self.send(200, answer(rows))
        elif fault == "short":
            self.send(200, answer(rows[:-1]))
        elif fault == "duplicated":
            self.send(200, answer([row(0), *rows[:-1]]))
        elif fault == "out-of-range":
            self.send(200, answer([*rows[:-1], row(count)]))
        elif fault == "wrong-dimension":
            self.send(200, answer([row(i, [1.0, 2.0, 3.0]) for i in range(count)]))
        elif fault == "nan":
            self.send(200, answer([*rows[:-1], row(count - 1, [1.0, math.nan, 2.0, 3.0])]))
        elif fault == "no-data":
            self.send(200, b'{"object": "list", "model": "stub", "usage": {"prompt_tokens": 1, "total_tokens": 1}}')
        elif fault == "not-json":
            self.send(200, b"Service temporarily unavailable, please retry")
        elif fault == "a-list":
            self.send(200, b"[1, 2, 3]")
        elif fault == "bad-base64":
            self.send(200, answer([{**row(i), "embedding": "%%%not base64%%%"} for i in range(count)]))
        elif fault in ("html-200", "html-502"):
            self.send(int(fault[-3:]), HTML, "text/html")
        elif fault == "cut-off":
            whole = answer(rows)
            self.raw(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            self.raw(f"Content-Length: {len(whole) + 500}\r\n\r\n".encode() + whole[:40])
            self.close_connection = True
        elif fault in ("retry-after-86400", "retry-after-3"):
            error = b'{"error": {"message": "too many requests; retry later", "type": "rate_limit_error"}}'
            self.send(429, error, headers={"Retry-After": fault.rsplit("-", 1)[1]})
        elif fault == "busy-once":
            if calls % 2:
                self.send(503, b'{"error": {"message": "busy", "type": "server_error"}}', headers={"Retry-After": "1"})
            else:
                self.send(200, answer(rows))
        elif fault == "trickle":
            whole = answer(rows)
            self.raw(
                f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(whole)}\r\n\r\n".encode()
            )
            self.trickle(whole)
        elif fault == "trickle-headers":
            self.trickle(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"x" * 100)
        else:
            raise AssertionError(f"unknown fault {fault!r}")

    def send(self, status: int, body: bytes, kind: str = "application/json", headers: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def raw(self, data: bytes) -> None:
        self.wfile.write(data)

    def trickle(self, data: bytes) -> None:
        """One byte a second, for at most 60 s (the client should leave long before)."""
        self.close_connection = True
        for byte in data[:60]:
            try:
                self.wfile.write(bytes([byte]))
            except OSError:
                return
            time.sleep(1)


def serve() -> Iterator[Stub]:
    server = Stub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def stub() -> Iterator[Stub]:
    """One stub for the fault tests."""
    yield from serve()


@pytest.fixture
def fresh() -> Iterator[Stub]:
    """A stub of the test's own, whose connections only the test opens."""
    yield from serve()


def wait_until(condition: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# -- each fault is an e5v error, within the timeout, that says what the server sent -------------------

FAULTS = {
    "short": (5.0, r"sent an answer e5v cannot use \(2 vectors for the 3 items sent\); it began '\{\"object\""),
    "duplicated": (5.0, r"indices \[0, 0, 1\], not 0 to 2 once each"),
    "out-of-range": (5.0, r"indices \[0, 1, 3\], not 0 to 2 once each"),
    "wrong-dimension": (5.0, r"row 0 has 12 bytes, not 4 x the server's dimension 4"),
    "nan": (5.0, r"row 2 holds NaN or infinite values"),
    "no-data": (5.0, r"\(data: Field required\); it began '\{\"object\": \"list\", \"model\": \"stub\""),
    "not-json": (5.0, r"\(Invalid JSON: .*\); it began 'Service temporarily unavailable, please retry'"),
    "a-list": (5.0, r"\(Input should be an object\); it began '\[1, 2, 3\]'"),
    "bad-base64": (5.0, r"row 0's embedding is not base64"),
    "html-200": (5.0, r"\(Invalid JSON: .*\); it began '<html><head><title>502 Bad Gateway"),
    "html-502": (5.0, r"answered 502 to .*/v1/embeddings: text/html: '<html><head><title>502 Bad Gateway</title>"),
    "cut-off": (5.0, r"the answer broke off after 40 bytes: .*; it began '\{\"object\": \"list\""),
    "retry-after-86400": (30.0, r"answered 429 .*too many requests.*asked to wait 86400 s \(Retry-After\), more than "),
    "retry-after-3": (2.0, r"the next try would have to wait 3 s, past the call's timeout=2 s"),
    "trickle": (2.5, r"did not answer within the call's timeout=2.5 s .*it had sent \d+ bytes: '\{\"o"),
    "trickle-headers": (2.5, r"did not answer within the call's timeout=2.5 s"),
}
#: Faults that must fail at once, whatever the timeout.
AT_ONCE = {"retry-after-86400", "retry-after-3"}


def check_fault(started: float, caught: pytest.ExceptionInfo[E5VError], fault: str) -> None:
    timeout, pattern = FAULTS[fault]
    elapsed = time.monotonic() - started
    assert type(caught.value) is EmbeddingError
    assert re.search(pattern, str(caught.value)), str(caught.value)
    assert elapsed < (2.0 if fault in AT_ONCE else timeout + MARGIN), elapsed


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_answer_is_an_e5v_error_within_the_timeout(stub: Stub, fault: str) -> None:
    timeout = FAULTS[fault][0]
    with RemoteEmbedder(f"{stub.url}/{fault}", timeout=timeout) as remote:
        assert remote.dimension == DIMENSION
        started = time.monotonic()
        with pytest.raises(E5VError) as caught:
            remote.embed_texts(["a", "b", "c"])
    check_fault(started, caught, fault)


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_faulty_answer_is_an_e5v_error_within_the_timeout_async(stub: Stub, fault: str) -> None:
    timeout = FAULTS[fault][0]

    async def embed() -> None:
        async with RemoteEmbedder(f"{stub.url}/{fault}", timeout=timeout) as remote:
            await remote.aembed_texts(["a", "b", "c"])

    started = time.monotonic()
    with pytest.raises(E5VError) as caught:
        asyncio.run(embed())
    check_fault(started, caught, fault)


def test_the_timeout_bounds_the_whole_call_across_requests(stub: Stub) -> None:
    """Ten items go in two requests (the stub takes 8 a request); the second may only have what is left."""
    with RemoteEmbedder(f"{stub.url}/trickle", timeout=2.0) as remote:
        remote.info  # noqa: B018 - fetched before the clock starts
        started = time.monotonic()
        with pytest.raises(EmbeddingError, match="did not answer within the call's timeout=2 s"):
            remote.embed_texts([f"text {i}" for i in range(10)])
    assert time.monotonic() - started < 2.0 + MARGIN


def test_a_short_retry_after_is_obeyed(stub: Stub) -> None:
    with RemoteEmbedder(f"{stub.url}/busy-once", timeout=10) as remote:
        before = stub.calls.get("busy-once", 0)
        started = time.monotonic()
        vectors = remote.embed_texts(["a", "b"])
        assert time.monotonic() - started >= 1.0
    assert stub.calls["busy-once"] - before == 2
    np.testing.assert_array_equal(vectors, [vector(0), vector(1)])


def test_retry_after_cap_is_an_option(stub: Stub) -> None:
    assert RemoteEmbedder(stub.url).max_retry_after == MAX_RETRY_AFTER == 10.0
    with RemoteEmbedder(f"{stub.url}/retry-after-3", max_retry_after=1, timeout=30) as remote:
        started = time.monotonic()
        with pytest.raises(EmbeddingError, match=r"asked to wait 3 s \(Retry-After\), more than max_retry_after=1 s"):
            remote.embed_texts(["a"])
    assert time.monotonic() - started < 2.0
    for bad in ({"timeout": 0}, {"retries": -1}, {"max_retry_after": -1}):
        with pytest.raises(ConfigurationError, match=next(iter(bad))):
            RemoteEmbedder(stub.url, **bad)


# -- one pooled connection, closed by close() and the context managers ----------------------------


def test_the_client_reuses_one_connection(fresh: Stub) -> None:
    remote = RemoteEmbedder(f"{fresh.url}/ok")
    for count in (1, 2, 3):
        np.testing.assert_array_equal(remote.embed_texts(["x"] * count), [vector(i) for i in range(count)])
    remote.embed_texts([f"text {i}" for i in range(20)])  # three requests
    assert (fresh.accepted, fresh.calls["ok"]) == (1, 6)
    remote.close()


def test_the_async_client_reuses_one_connection(fresh: Stub) -> None:
    async def embed() -> list[np.ndarray]:
        async with RemoteEmbedder(f"{fresh.url}/ok") as remote:
            return [await remote.aembed_texts(["x"] * count) for count in (1, 2, 3, 20)]

    results = asyncio.run(embed())
    assert (fresh.accepted, fresh.calls["ok"]) == (1, 6)
    np.testing.assert_array_equal(results[2], [vector(i) for i in range(3)])


def test_close_and_the_context_managers_close_the_connection(fresh: Stub) -> None:
    stub = fresh
    with RemoteEmbedder(f"{stub.url}/ok") as remote:
        remote.embed_texts(["x"])
        assert stub.open == 1
    assert wait_until(lambda: stub.open == 0), "the connection outlived the with block"
    with pytest.raises(ConfigurationError, match=r"RemoteEmbedder\('http://.*/ok'\) is closed; create a new"):
        remote.embed_texts(["x"])

    async def embed() -> RemoteEmbedder:
        async with RemoteEmbedder(f"{stub.url}/ok") as remote:
            await remote.aembed_texts(["x"])
            remote.embed_texts(["y"])
            assert stub.open == 2
        return remote

    remote = asyncio.run(embed())
    assert wait_until(lambda: stub.open == 0), "a connection outlived the async with block"
    with pytest.raises(ConfigurationError, match="is closed"):
        asyncio.run(remote.aembed_texts(["x"]))


def test_an_unreachable_server_is_retried_then_named() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(EmbeddingError, match=r"cannot reach the e5v server at .* after 3 tries; is `e5v serve`"):
        RemoteEmbedder(url, retries=2).embed_texts(["x"])
    assert 1.5 <= time.monotonic() - started < 1.5 + MARGIN  # waited 0.5 s, then 1 s


# -- against the real server: the async calls give the sync calls' vectors ---------------------------


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path, "--max-client-batch-size", "4")
    yield url
    stop(process)


def test_the_async_calls_equal_the_sync_ones(server: str, photos: dict, photo_dir: Path) -> None:
    cat = photo_dir / "cat.png"
    texts = [f"text number {n}" for n in range(9)]  # three requests of at most 4
    images = [cat, photos["coffee"], cat.read_bytes()]
    mixed = ["a cat", cat, Interleaved([photos["cat"], "on a sofa"]), Composed(photos["coffee"], "in a red cup")]

    async def embed(remote: RemoteEmbedder) -> tuple[np.ndarray, ...]:
        return await asyncio.gather(
            remote.aembed_texts(texts, batch_size=3),
            remote.aembed_images(images),
            remote.aembed_composed([cat], ["make it a dog"]),
            remote.aembed_interleaved([[cat, "a cat"], Interleaved(["two photos", cat, photos["coffee"]])]),
            remote.aembed(mixed, prompts="cirr"),
            remote.aembed_texts([]),
        )

    with RemoteEmbedder(server, api_key=KEY) as remote:
        expected = (
            remote.embed_texts(texts, batch_size=3),
            remote.embed_images(images),
            remote.embed_composed([cat], ["make it a dog"]),
            remote.embed_interleaved([[cat, "a cat"], Interleaved(["two photos", cat, photos["coffee"]])]),
            remote.embed(mixed, prompts="cirr"),
            remote.embed_texts([]),
        )
        for got, want in zip(asyncio.run(embed(remote)), expected):
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # batched with other requests' items
        assert expected[-1].shape == (0, remote.dimension)


def test_async_errors_name_the_item_in_the_callers_list(server: str, photo_dir: Path) -> None:
    async def embed() -> None:
        async with RemoteEmbedder(server, api_key=KEY) as remote:
            await remote.aembed_texts([*(f"text {n}" for n in range(6)), "an <image> here"])

    with pytest.raises(InvalidInputError, match=r"^item 6: .*reserved") as raised:
        asyncio.run(embed())  # in the second request of 4
    assert raised.value.index == 6
    with pytest.raises(InvalidInputError, match=r"^item 1: image file .*cannot be read"):
        asyncio.run(RemoteEmbedder(server, api_key=KEY).aembed_images([photo_dir / "cat.png", photo_dir / "no.png"]))
    with pytest.raises(ConfigurationError, match="refused the API key"):
        asyncio.run(RemoteEmbedder(server, api_key="wrong").aembed_texts(["x"]))
