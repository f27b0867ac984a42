"""``e5v serve`` on the second day, as a real subprocess on a loopback port: a port in use
is one error line, the start-up lines say what is served, the access log is opt-in and
quiet about static files, a missing key and a wrong key are told apart (by the server and
by ``RemoteEmbedder``), and answers carry text-embeddings-inference's timing headers and
an ``x-request-id``."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from serving import KEY, free_port

from e5v.client import RemoteEmbedder
from e5v.errors import ConfigurationError

TIMING = ("x-total-time", "x-queue-time", "x-inference-time", "x-compute-tokens")


@dataclass
class Served:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def stop(self) -> list[str]:
        """Stop the server; the lines it wrote."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        return self.log.read_text(encoding="utf-8").splitlines()


def environment(key: str | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "E5V_API_KEY"}
    return {**env, "HF_HUB_OFFLINE": "1", **({} if key is None else {"E5V_API_KEY": key})}


def serve(log: Path, *arguments: str | Path, key: str | None = KEY) -> Served:
    """``e5v serve ARGUMENTS --port FREE``, its stderr into ``log``, once it is ready."""
    port = free_port()
    command = [sys.executable, "-m", "e5v", "serve", *map(str, arguments), "--port", str(port)]
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=environment(key))
    served = Served(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(f"{served.url}/ready", timeout=1).status_code == 200:
                return served
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    served.stop()
    raise AssertionError("the server did not become ready in 120 s")


def auth(key: str | None = KEY) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def milliseconds(response: httpx.Response, name: str) -> int:
    value = response.headers[name]
    assert value.isdigit(), (name, value)
    return int(value)


# -- a port in use ----------------------------------------------------------------------------


def test_a_port_in_use_is_one_error_line_and_status_2_before_anything_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "e5v", "serve", "--model", str(tmp_path / "never-loaded"), "--port", str(port)]
        done = subprocess.run(command, capture_output=True, text=True, env=environment(None), timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"e5v serve: error: port {port} on 127.0.0.1 is in use (another server, or another `e5v serve`, listens "
        "there); pick a free --port, or stop what holds it\n"
    )


def test_a_bad_port_or_host_is_one_error_line(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "e5v", "serve", "--model", str(tmp_path / "never-loaded")]
    for extra, expected in (
        (["--port", "70000"], "e5v serve: error: argument --port: expected a port from 0 to 65535, got '70000'"),
        (["--host", "192.0.2.1", "--port", "8000"], "e5v serve: error: --host 192.0.2.1 is not an address of this"),
    ):
        done = subprocess.run([*base, *extra], capture_output=True, text=True, env=environment(None), timeout=120)
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        assert done.stderr.startswith(expected), done.stderr


# -- keys, headers, start-up lines and the access log ------------------------------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("keyed") / "serve.log"
    served = serve(log, "--model", tiny_path, "--served-model-name", "tiny", "--access-log")
    yield served
    if served.process.poll() is None:
        served.stop()


def test_a_missing_key_and_a_wrong_key_are_told_apart(keyed: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"input": "a cat"}
    missing = httpx.post(f"{keyed.url}/v1/embeddings", json=body, timeout=30)
    wrong = httpx.post(f"{keyed.url}/v1/embeddings", json=body, headers=auth("wrong"), timeout=30)
    empty = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer"}, timeout=30)
    basic = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Basic abc"}, timeout=30)
    assert [r.status_code for r in (missing, wrong, empty, basic)] == [401] * 4
    said = [r.json()["error"]["message"] for r in (missing, wrong, empty, basic)]
    assert (
        said[0]
        == said[2]
        == ("no API key was sent, and this server needs one; send the header Authorization: Bearer KEY")
    )
    assert said[1] == "the API key sent is not one of this server's keys; check it (Authorization: Bearer KEY)"
    assert said[3].startswith("the Authorization header must be Bearer KEY, not 'Basic'")
    assert {r.json()["error"]["type"] for r in (missing, wrong)} == {"authentication_error"}

    monkeypatch.delenv("E5V_API_KEY", raising=False)
    with pytest.raises(ConfigurationError) as none_sent:
        RemoteEmbedder(keyed.url, retries=0).embed_texts(["a cat"])
    assert str(none_sent.value) == (
        f"the e5v server at {keyed.url}/v1/embeddings needs an API key and none was sent; set $E5V_API_KEY to one "
        "of its keys (or pass one: `RemoteEmbedder(api_key=...)`)"
    )
    with pytest.raises(ConfigurationError) as given:
        RemoteEmbedder(keyed.url, api_key="wrong", retries=0).embed_texts(["a cat"])
    assert str(given.value) == (
        f"the e5v server at {keyed.url}/v1/embeddings refused the API key given as `api_key`: the API key sent is "
        "not one of this server's keys; check it (Authorization: Bearer KEY)"
    )
    monkeypatch.setenv("MY_KEY", "also-wrong")
    with pytest.raises(ConfigurationError, match=r"refused the API key from \$MY_KEY: the API key sent is not one"):
        RemoteEmbedder(keyed.url, api_key_env_var="MY_KEY", retries=0).embed_texts(["a cat"])
    assert RemoteEmbedder(keyed.url, api_key=KEY).embed_texts(["a cat"]).shape[0] == 1


def test_embeddings_carry_the_timing_headers_and_the_request_id(keyed: Served) -> None:
    body = {"input": ["a photo of a cat", "espresso brewing"]}
    answer = httpx.post(
        f"{keyed.url}/v1/embeddings", json=body, headers={**auth(), "x-request-id": "job-42"}, timeout=60
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-request-id"] == "job-42"
    assert int(answer.headers["x-compute-tokens"]) == answer.json()["usage"]["total_tokens"] > 0
    total = milliseconds(answer, "x-total-time")
    assert total >= milliseconds(answer, "x-queue-time") and total >= milliseconds(answer, "x-inference-time")

    hostile = "a b<script>\t;" + "x" * 500
    echoed = httpx.post(f"{keyed.url}/v1/embeddings", json=body, headers={**auth(), "x-request-id": hostile})
    assert echoed.headers["x-request-id"] == ("abscript" + "x" * 500)[:128]
    first, second = (httpx.post(f"{keyed.url}/v1/embeddings", json=body, headers=auth()) for _ in range(2))
    made = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", made_id) for made_id in made) and made[0] != made[1]

    models = httpx.get(f"{keyed.url}/v1/models", headers=auth(), timeout=30)
    assert "x-request-id" in models.headers and not set(TIMING) & set(models.headers)
    refused = httpx.post(f"{keyed.url}/v1/embeddings", json=body, timeout=30)
    assert "x-total-time" in refused.headers and "x-compute-tokens" not in refused.headers  # nothing embedded

    schema = httpx.get(f"{keyed.url}/openapi.json", timeout=30).json()
    documented = schema["paths"]["/v1/embeddings"]["post"]["responses"]
    assert set(documented["200"]["headers"]) == {"x-request-id", *TIMING}
    assert "x-request-id" in documented["401"]["headers"] and "Retry-After" in documented["429"]["headers"]
    assert set(schema["paths"]["/health"]["get"]["responses"]["200"]["headers"]) == {"x-request-id"}


def test_the_start_up_lines_one_ready_line_and_the_access_log(keyed: Served, tiny_path: Path, embedder) -> None:
    httpx.post(f"{keyed.url}/v1/embeddings", json={"input": "x"}, headers={**auth(), "x-request-id": "logged-1"})
    assert httpx.get(f"{keyed.url}/docs/ui/swagger-ui.css", timeout=30).status_code == 200  # a static file
    lines = keyed.stop()
    said = [line for line in lines if not line.startswith("INFO e5v.server.access: ")]
    assert said[:3] == [
        f"INFO e5v.cli.serve: model: {tiny_path}, served as 'tiny', loading",
        "INFO e5v.cli.serve: keys: on (1); /v1/* needs Authorization: Bearer KEY",
        f"INFO e5v.cli.serve: listening on {keyed.url} (API docs: {keyed.url}/docs)",
    ]
    ready = [line for line in said if "ready" in line.lower()]
    assert len(ready) == 1 and re.fullmatch(
        rf"INFO e5v\.server\.app: ready: tiny, {embedder.dimension}-d, on cpu in float32, loaded in [0-9.]+ s", ready[0]
    )
    access = [line for line in lines if line.startswith("INFO e5v.server.access: ")]
    assert any(
        re.fullmatch(r'INFO e5v\.server\.access: 127\.0\.0\.1:\d+ "POST /v1/embeddings" 200 [0-9.]+ ms id=logged-1', a)
        for a in access
    ), access
    assert any('"GET /ready" 200' in line for line in access) and any('"GET /v1/models" 401' in line for line in access)
    assert not [line for line in access if "/docs/ui/" in line]
    assert not [line for line in said if "uvicorn" in line.lower() and "INFO" in line], said


# -- a collection ------------------------------------------------------------------------------


def test_a_collection_is_named_at_start_search_is_timed_and_the_access_log_is_off(
    tmp_path: Path, photo_dir: Path, tiny_path: Path
) -> None:
    corpus, db = tmp_path / "corpus", tmp_path / "db"
    shutil.copytree(photo_dir, corpus)
    command = [sys.executable, "-m", "e5v", "index", str(corpus), "--db", str(db), "--model", str(tiny_path), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(None), timeout=300)
    assert done.returncode == 0, done.stderr
    records = len(list(photo_dir.iterdir()))
    served = serve(tmp_path / "serve.log", "--db", db, key=None)
    try:
        found = httpx.post(f"{served.url}/v1/search", json={"text": "a cat", "k": 2}, timeout=60)
        assert found.status_code == 200, found.text
        assert int(found.headers["x-compute-tokens"]) > 0 and "x-inference-time" in found.headers
        like = httpx.post(f"{served.url}/v1/search", json={"like": found.json()["hits"][0]["id"]}, timeout=60)
        assert like.status_code == 200, like.text
        assert "x-total-time" in like.headers and "x-compute-tokens" not in like.headers  # nothing embedded
        assert found.headers["x-request-id"] != like.headers["x-request-id"]
    finally:
        lines = served.stop()
    assert f"INFO e5v.cli.serve: collection: 'e5v' in {db}, {records} records" in lines
    assert f"INFO e5v.cli.serve: search page: {served.url}/" in lines
    assert "INFO e5v.cli.serve: keys: off; anyone who can reach 127.0.0.1:" in "\n".join(lines)
    assert not [line for line in lines if "e5v.server.access" in line]  # off without --access-log
