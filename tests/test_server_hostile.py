"""``e5v serve`` against slow and hostile clients, through real sockets to a real server
subprocess: stalled bodies hold no slot, read timeouts, the connection bound, a bounded
SIGTERM, key rules, the Host check and CORS, and search under the concurrency limit."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from serving import KEY, launch, start_server, stop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: A POST whose body never finishes: headers, a Content-Length, and a few of its bytes.
STALLED = (
    "POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
    'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"inp'
)


def no_key_env() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != "E5V_API_KEY"}


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=5)


def stalled(url: str) -> socket.socket:
    sock = connect(url)
    sock.sendall(STALLED.format(key=KEY).encode())
    return sock


def until_closed(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it has not within ``within`` s."""
    sock.settimeout(within)
    received = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        except TimeoutError:
            break
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept the connection open for {within} s; it sent {received!r}")


def closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (waiting a moment for it)."""
    sock.settimeout(0.3)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def trickled(sock: socket.socket) -> bool:
    """Send one more byte; whether the server has closed ``sock``."""
    try:
        sock.send(b"a")
    except OSError:
        return True
    return closed(sock)


def embed(url: str, body: object, headers: dict[str, str] = AUTH) -> httpx.Response:
    return httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=120)


# -- slots, read timeouts, connections ------------------------------------------------


@pytest.fixture(scope="module")
def patient(tiny_path: Path) -> Iterator[str]:
    """Few slots, a long body timeout: stalled bodies stay stalled through a test."""
    process, url = start_server(tiny_path, "--max-concurrent-requests", "8", "--body-timeout", "120")
    yield url
    stop(process)


@pytest.fixture(scope="module")
def strict(tiny_path: Path) -> Iterator[str]:
    """One-second body and header timeouts, a long keep-alive."""
    options = ("--body-timeout", "1", "--header-timeout", "1", "--keep-alive-timeout", "30")
    process, url = start_server(tiny_path, *options)
    yield url
    stop(process)


def test_hundreds_of_stalled_bodies_hold_no_slot(patient: str) -> None:
    sockets = [stalled(patient) for _ in range(300)]  # 300 stalled bodies, 8 slots
    try:
        time.sleep(1.0)  # the server has read every one's headers
        for n in range(3):
            answer = embed(patient, {"input": [f"a normal request {n}"]})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["data"]) == 1
        assert not any(closed(sock) for sock in sockets[:5])  # still waiting for their bodies
    finally:
        for sock in sockets:
            sock.close()


def test_a_stalled_body_gets_408_and_its_connection_closed(strict: str) -> None:
    started = time.monotonic()
    answer = until_closed(stalled(strict), within=15)
    assert time.monotonic() - started >= 0.9
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert "body timeout of 1 s" in error["message"] and error["type"] == "invalid_request_error"


def test_a_body_within_the_timeout_is_served(strict: str) -> None:
    body = json.dumps({"input": ["sent in two parts"]}).encode()
    sock = connect(strict)
    head = f"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
    sock.sendall(
        f"{head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    sock.sendall(body[:10])
    time.sleep(0.3)
    sock.sendall(body[10:])
    assert until_closed(sock, within=60).startswith(b"HTTP/1.1 200")


def test_partial_headers_are_closed_after_the_header_timeout(strict: str) -> None:
    sock = connect(strict)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    started = time.monotonic()
    assert until_closed(sock, within=15) == b""
    assert time.monotonic() - started >= 0.9

    trickle = connect(strict)  # a byte every 0.3 s never resets the clock
    trickle.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
    assert any(trickled(trickle) for _ in range(40)), "a trickle of header bytes kept the connection open for 12 s"


def test_headers_after_a_kept_alive_answer_have_the_same_timeout(strict: str) -> None:
    sock = connect(strict)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    sock.settimeout(10)
    received = b""
    for _ in range(20):
        received += sock.recv(65536)
        if received.endswith(b'{"status":"ok"}'):
            break
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b'{"status":"ok"}'), received
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127")  # the next request's headers, never finished
    assert until_closed(sock, within=15) == b""


def test_connections_over_the_limit_are_closed_at_once(tiny_path: Path) -> None:
    process, url = start_server(tiny_path, "--max-connections", "4", "--header-timeout", "60")
    try:
        held = [connect(url) for _ in range(4)]
        time.sleep(0.5)  # accepted: the server holds 4
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=10)
        for sock in held:
            sock.close()
        answers = []
        for _ in range(50):
            try:
                answers.append(httpx.get(f"{url}/health", timeout=10).status_code)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert answers == [200]
    finally:
        stop(process)


def test_sigterm_with_a_stalled_client_exits_within_the_graceful_bound(tiny_path: Path) -> None:
    process, url = start_server(tiny_path, "--graceful-shutdown-timeout", "1", "--body-timeout", "300")
    try:
        body, headers = stalled(url), connect(url)
        headers.sendall(b"GET /health HTTP/1.1\r\nHost: 127")
        time.sleep(0.5)
        started = time.monotonic()
        process.terminate()
        process.wait(timeout=30)  # 1 s to drain, then the stalled request is cancelled
        assert time.monotonic() - started < 30
        body.close()
        headers.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- keys --------------------------------------------------------------------------------


def serve_refused(arguments: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "e5v", "serve", *arguments, "--port", "9"]
    return subprocess.run(command, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=120)


@pytest.mark.parametrize(
    ("arguments", "variable", "expected"),
    [
        (["--api-key", ""], None, "--api-key is empty"),
        (["--api-key", "   "], None, "--api-key is empty"),
        (["--api-key", " ", "--db", "somewhere", "--host", "0.0.0.0"], None, "--api-key is empty"),
        ([], "", "$E5V_API_KEY is set but holds no key"),
        ([], " , ", "$E5V_API_KEY is set but holds no key"),
        (["--api-key-file", "{empty}"], None, "holds no key"),
        (["--api-key-file", "{missing}"], None, "cannot be read"),
    ],
)
def test_an_empty_key_is_refused_at_start_with_one_line(
    tiny_path: Path, tmp_path: Path, arguments: list[str], variable: str | None, expected: str
) -> None:
    (tmp_path / "empty").write_text("\n  \n")
    files = {"empty": str(tmp_path / "empty"), "missing": str(tmp_path / "missing")}
    env = no_key_env() if variable is None else {**no_key_env(), "E5V_API_KEY": variable}
    result = serve_refused(["--model", str(tiny_path), *(arg.format(**files) for arg in arguments)], env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e5v serve: error: "), result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def keyed(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Keys from a file, an extra allowed host, and one CORS origin."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("\nkey-one\n\n  key-two  \n")
    options = [
        "--api-key-file",
        str(keys),
        "--allowed-hosts",
        "Models.Lan:8443",
        "--cors-origin",
        "https://app.example",
    ]
    process, url = launch(["--model", str(tiny_path), *options], no_key_env())
    yield url
    stop(process)


def test_keys_from_a_file_and_an_empty_bearer_is_401(keyed: str) -> None:
    for key in ("key-one", "key-two"):
        assert httpx.get(f"{keyed}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for value in ("Bearer", "Bearer key-three", "key-one"):
        assert httpx.get(f"{keyed}/v1/models", headers={"Authorization": value}).status_code == 401
    sock = connect(keyed)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \r\nConnection: close\r\n\r\n")
    answer = until_closed(sock, within=15)
    assert answer.startswith(b"HTTP/1.1 401"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["type"] == "authentication_error"


# -- the Host check and CORS ----------------------------------------------------------


def test_allowed_hosts_extend_the_check_on_a_keyed_server_and_cors_is_opt_in(keyed: str) -> None:
    auth = {"Authorization": "Bearer key-one"}
    for host in ("models.lan", "MODELS.lan:8000", "localhost"):
        assert httpx.get(f"{keyed}/v1/models", headers={**auth, "Host": host}).status_code == 200, host
    refused = httpx.get(f"{keyed}/v1/models", headers={**auth, "Host": "attacker.example"})
    assert refused.status_code == 421 and "--allowed-hosts" in refused.json()["error"]["message"]

    allowed = httpx.get(f"{keyed}/health", headers={"Origin": "https://app.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.get(f"{keyed}/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    preflight = httpx.options(
        f"{keyed}/v1/embeddings",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"


def test_a_keyed_loopback_server_without_allowed_hosts_answers_any_host(strict: str) -> None:
    assert httpx.get(f"{strict}/health", headers={"Host": "attacker.example"}).status_code == 200
    assert "access-control-allow-origin" not in httpx.get(f"{strict}/health", headers={"Origin": "https://a.b"}).headers


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> Path:
    root = tmp_path_factory.mktemp("hostile-db")
    shutil.copytree(EXAMPLES, root / "data", ignore=shutil.ignore_patterns("*.pdf"))
    command = [sys.executable, "-m", "e5v", "index", str(root / "data"), "--model", str(tiny_path)]
    done = subprocess.run(
        [*command, "--db", str(root / "db"), "--quiet"],
        capture_output=True,
        text=True,
        env={**no_key_env(), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return root / "db"


@pytest.fixture(scope="module")
def open_db(db: Path) -> Iterator[str]:
    """A keyless ``--db`` server on loopback, one slot."""
    process, url = launch(["--db", str(db), "--max-concurrent-requests", "1"], no_key_env())
    yield url
    stop(process)


def test_a_keyless_loopback_server_answers_only_loopback_host_names(open_db: str) -> None:
    port = open_db.rsplit(":", 1)[1]
    found = httpx.post(f"{open_db}/v1/search", json={"text": "a photo", "k": 20}, timeout=60)
    assert found.status_code == 200, found.text
    image = next(hit for hit in found.json()["hits"] if hit["thumbnail"])
    routes = [
        ("GET", "/", None),
        ("GET", image["thumbnail"], None),
        ("GET", "/v1/collection", None),
        ("POST", "/v1/search", {"text": "a photo"}),
        ("POST", "/v1/embeddings", {"input": "a photo"}),
        ("GET", "/health", None),
    ]
    with httpx.Client(base_url=open_db, timeout=60) as client:
        for method, path, body in routes:
            for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", "localhost.attacker"):
                refused = client.request(method, path, json=body, headers={"Host": host})
                assert refused.status_code == 421, (method, path, host, refused.text)
                assert "is not a name of this server" in refused.json()["error"]["message"]
            for host in (f"localhost:{port}", "localhost", f"127.0.0.1:{port}", f"[::1]:{port}", "[::1]"):
                answer = client.request(method, path, json=body, headers={"Host": host})
                assert answer.status_code == 200, (method, path, host, answer.text)


# -- search under the concurrency limit ----------------------------------------------


def test_search_over_the_concurrency_limit_is_429(open_db: str) -> None:
    long_texts = [" ".join(f"word{n}_{i}" for i in range(700)) for n in range(32)]  # seconds on the one slot
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(embed, open_db, {"input": long_texts}, {})
        while not busy.done() and "e5v_requests_in_flight 1.0" not in httpx.get(f"{open_db}/metrics").text:
            time.sleep(0.05)  # the long request holds the one slot before any search asks for it
        refused = None
        for _ in range(40):
            answer = httpx.post(f"{open_db}/v1/search", json={"text": "a photo"}, timeout=60)
            if answer.status_code == 429 or busy.done():
                refused = answer
                break
            time.sleep(0.25)
        assert busy.result().status_code == 200
    assert refused is not None and refused.status_code == 429, None if refused is None else refused.text
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and "limit of 1 concurrent requests" in error["message"]
    assert httpx.post(f"{open_db}/v1/search", json={"text": "a photo"}, timeout=60).status_code == 200
