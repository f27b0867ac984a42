"""For the scale-out tests: a counting proxy in front of a real ``e5v serve``, ``e5v serve --replicas``,
and a real ``chroma run``.

The proxy forwards every request as it came and every answer as it went (status, body, headers
but those of the hop); it counts the embedding requests, the most of them in flight at once, and
the ``x-e5v-replica`` headers the answers carried. ``fail_marker``: an embedding request whose
body holds it is answered 500 without being forwarded (a replica that breaks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from serving import free_port

#: Headers of one hop, not passed on.
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}
CHROMA_STARTUP_S = 60
REPLICAS_STARTUP_S = 300  # Ray starts, then each replica loads the model, on 2 busy cores


class CountingProxy:
    """A threaded HTTP proxy on 127.0.0.1 to ``upstream``; ``url`` is its address."""

    def __init__(self, upstream: str, fail_marker: str | None = None) -> None:
        self.upstream = upstream
        self.fail_marker = fail_marker
        self.embeddings = 0  # embedding requests received
        self.in_flight = 0
        self.peak = 0  # the most embedding requests in flight at once
        self.replicas: Counter[str] = Counter()  # x-e5v-replica of the embedding answers
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=120)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                proxy._forward(self, b"")

            def do_POST(self) -> None:
                proxy._forward(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-proxy", daemon=True)

    def __enter__(self) -> CountingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._client.close()

    def reset(self) -> None:
        with self._lock:
            self.embeddings = self.peak = 0
            self.replicas.clear()

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        embedding = handler.command == "POST" and handler.path.startswith("/v1/embeddings")
        if embedding:
            with self._lock:
                self.embeddings += 1
                self.in_flight += 1
                self.peak = max(self.peak, self.in_flight)
        try:
            if embedding and self.fail_marker is not None and self.fail_marker.encode() in body:
                self._answer(handler, 500, {"content-type": "text/plain"}, b"a broken replica")
                return
            headers = {key: value for key, value in handler.headers.items() if key.lower() not in HOP}
            answer = self._client.request(handler.command, self.upstream + handler.path, headers=headers, content=body)
            if embedding and "x-e5v-replica" in answer.headers:
                with self._lock:
                    self.replicas[answer.headers["x-e5v-replica"]] += 1
            self._answer(handler, answer.status_code, answer.headers, answer.content)
        finally:
            if embedding:
                with self._lock:
                    self.in_flight -= 1

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, headers: object, body: bytes) -> None:
        handler.send_response(status)
        for key, value in headers.items():  # type: ignore[attr-defined]
            if key.lower() not in HOP:
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


@contextmanager
def replicas(model: Path, count: int, env: dict[str, str], timeout: float = REPLICAS_STARTUP_S) -> Iterator[str]:
    """``e5v serve --model MODEL --replicas COUNT --threads 1`` (its own Ray cluster) on a free port: its URL,
    once ``/ready`` is 200. Stopped by SIGTERM (the cluster it started stops with it), else killed with its group."""
    port = free_port()
    command = [sys.executable, "-m", "e5v", "serve", "--model", str(model), "--replicas", str(count), "--threads", "1"]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
            start_new_session=True,  # Ray's processes with it, to be ended together if it will not stop
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"e5v serve --replicas exited: {log.read()[-3000:]}")
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"e5v serve --replicas was not ready within {timeout:.0f} s"
                time.sleep(0.5)
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


@contextmanager
def chroma_server(root: Path) -> Iterator[str]:
    """A ``chroma run`` on a free loopback port, storing under ``root``: its URL, once it answers."""
    chroma = Path(sys.executable).parent / "chroma"
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    with (root / "chroma.log").open("wb") as log:
        process = subprocess.Popen(
            [str(chroma), "run", "--path", str(root / "db"), "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": str(Path(sys.executable).parent), "ANONYMIZED_TELEMETRY": "False", "HOME": str(root)},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + CHROMA_STARTUP_S
            while True:
                assert process.poll() is None, (root / "chroma.log").read_text()[-3000:]
                try:
                    if httpx.get(f"{url}/api/v2/heartbeat", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"chroma run did not answer within {CHROMA_STARTUP_S} s"
                time.sleep(0.25)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
