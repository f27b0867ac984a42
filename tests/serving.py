"""Starting ``e5v serve`` for tests: a real subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, *options: str) -> tuple[subprocess.Popen[str], str]:
    """``e5v serve --model MODEL OPTIONS`` with the test key, once it is ready."""
    return launch(["--model", str(model), *options], {**os.environ, "E5V_API_KEY": KEY})


def launch(arguments: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """``e5v serve ARGUMENTS --port FREE`` in ``env`` (offline), once it is ready: the process and its URL."""
    port = free_port()
    command = [sys.executable, "-m", "e5v", "serve", *arguments, "--port", str(port)]
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the server; a full pipe would stall it
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, text=True, env={**env, "HF_HUB_OFFLINE": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the server exited: {log.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not become ready in 120 s")


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
