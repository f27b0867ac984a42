"""The API's edges on a real ``e5v serve``: bodies that used to be 500s, quoting cut short,
405s that say what is allowed, ``/metrics``' type, and Swagger UI working offline."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from serving import KEY, free_port, start_server, stop

from e5v.server.errors import LastResort
from e5v.wire.schema import QUOTE_LIMIT

AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path)
    yield url
    stop(process)


def raw_exchange(url: str, requests: list[bytes]) -> list[bytes]:
    """Send each request on ONE connection, reading each answer before the next: the answers."""
    host, port = url.removeprefix("http://").split(":")
    answers = []
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        for request in requests:
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            head, _, body = answer.partition(b"\r\n\r\n")
            lengths = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
            length = int(lengths[0].split(b":", 1)[1])
            while len(body) < length:
                body += sock.recv(65536)
            answers.append(head + b"\r\n\r\n" + body)
    return answers


def post(path: str, body: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"input": "a cat", "prompts": []}, "prompts must be"),
        ({"input": "a cat", "prompts": {}}, "prompts must be"),
        ({"input": ""}, "input is empty; send at least one character"),
        ({"input": ["a cat", ""]}, "item 1: the text is empty"),
        ({"input": [{"type": "text", "text": ""}]}, "item 0: text is empty"),
        ({"input": []}, "input must be a string or a non-empty list of items, got an empty list"),
        ({"input": {"type": "text"}}, "input must be a string or a non-empty list of items, got an object"),
        ({"input": [[]]}, "item 0: an interleaved item needs at least one part"),
        ({"input": [[1, 2]]}, "item 0: token ids are not accepted"),
        ({"input": [{"type": "video"}]}, "item 0: unknown item type 'video'"),
        ({"input": "a cat", "model": "x" * 1_000_000}, "model 'xxxx"),
        ({"input": "a cat", "encoding_format": None}, "encoding_format"),
    ],
)
def test_bad_bodies_are_400s_in_the_error_shape(server: str, body: dict, expected: str) -> None:
    answer = httpx.post(f"{server}/v1/embeddings", json=body, headers=AUTH, timeout=60)
    assert answer.status_code in (400, 404), answer.text
    message = answer.json()["error"]["message"]
    assert expected in message and len(message) < 2 * QUOTE_LIMIT + 300, message


def test_deep_nesting_is_a_400_and_the_connection_stays_usable(server: str) -> None:
    deep = b'{"input": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    just_under = b'{"input": ' + b"[" * 150 + b"]" * 150 + b"}"  # parses, then fails the model
    deep_search = b'{"text": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    good = json.dumps({"input": "a cat"}).encode()
    answers = raw_exchange(
        server,
        [
            post("/v1/embeddings", deep),
            post("/v1/embeddings", just_under),
            post("/v1/search", deep_search),
            post("/v1/embeddings", good),
        ],
    )
    assert answers[0].startswith(b"HTTP/1.1 400"), answers[0][:300]
    assert b"nested deeper than 200 levels" in answers[0]
    assert answers[1].startswith(b"HTTP/1.1 400") and b"item 0" in answers[1], answers[1][:300]
    assert answers[2].startswith((b"HTTP/1.1 400", b"HTTP/1.1 404")), answers[2][:300]  # 404 if not a --db server
    assert answers[3].startswith(b"HTTP/1.1 200") and b'"embedding"' in answers[3]


def test_405_names_the_allowed_methods(server: str) -> None:
    for method, path, allowed in [("GET", "/v1/embeddings", "POST"), ("DELETE", "/health", "GET")]:
        answer = httpx.request(method, f"{server}{path}", headers=AUTH)
        assert answer.status_code == 405, answer.text
        assert allowed in answer.headers["allow"]
        assert answer.json()["error"]["message"] == "Method Not Allowed"


def test_metrics_are_prometheus_text(server: str) -> None:
    answer = httpx.get(f"{server}/metrics")
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE e5v_requests_total counter" in answer.text


def test_swagger_ui_works_offline(server: str, browser) -> None:
    context = browser.new_context()
    elsewhere: list[str] = []
    context.route("**/*", lambda handle, request: route_request(handle, request, server, elsewhere))
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(f"{server}/docs")
    page.wait_for_selector('[data-path="/v1/embeddings"]', timeout=60_000)
    assert page.locator(".opblock").count() >= 6
    context.close()
    assert elsewhere == [] and problems == []
    page_headers = httpx.get(f"{server}/docs").headers
    assert "default-src 'none'" in page_headers["content-security-policy"]


def route_request(route, request, server: str, elsewhere: list[str]) -> None:
    """Let the page reach its own server only, recording anything else it asks for."""
    if request.url.startswith(server):
        route.continue_()
    else:
        elsewhere.append(request.url)
        route.abort()


@pytest.fixture(scope="module")
def failing() -> Iterator[str]:
    """A real uvicorn serving an app whose one route fails where no handler expects it, under :class:`LastResort`."""
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("an unexpected bug")

    @app.get("/fine")
    async def fine() -> dict[str, str]:
        return {"status": "fine"}

    app.add_middleware(LastResort)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if server.started:
            break
        threading.Event().wait(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_an_unexpected_error_is_a_500_in_the_error_shape_on_a_kept_connection(failing: str) -> None:
    get = "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".format
    first, second = raw_exchange(failing, [get("/boom").encode(), get("/fine").encode()])
    assert first.startswith(b"HTTP/1.1 500")
    body = json.loads(first.partition(b"\r\n\r\n")[2])
    assert body["error"]["type"] == "server_error" and "in its log" in body["error"]["message"]
    assert b"an unexpected bug" not in first  # the traceback stays in the log
    assert second.startswith(b"HTTP/1.1 200")
