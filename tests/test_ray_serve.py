"""``e5v serve`` as Ray Serve replicas (``e5v.ray.serve``): a real local Ray cluster started
here, two replicas of the tiny checkpoint on CPU (one torch thread each), through real clients.

One application serves the whole module; the test that kills a replica runs last."""

from __future__ import annotations

import base64
import io
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import KEY, free_port

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'e5v[ray]')")
serve = pytest.importorskip("ray.serve")

from e5v import Interleaved, RemoteEmbedder  # noqa: E402
from e5v.errors import ConfigurationError  # noqa: E402
from e5v.ray.serve import APP_NAME, DEPLOYMENT_NAME, REPLICA_HEADER, ServeOptions, build, build_app  # noqa: E402

ATOL = 1e-5
TEXTS = ["a photo of a cat", "espresso brewing", "the rocket on its launch pad", "a photo of a cat"]
PER_REPLICA = 6  # --max-concurrent-requests of each replica
PAYLOAD_LIMIT = 1_000_000
BATCH_LIMIT = 32


@pytest.fixture(scope="module")
def app(tiny_path: Path) -> Iterator[str]:
    """The URL of two replicas of the tiny checkpoint, keyed, on a Ray cluster of this test's own."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        options = ServeOptions(
            model=str(tiny_path),
            replicas=2,
            threads=1,
            api_keys=[KEY],
            max_concurrent_requests=PER_REPLICA,
            max_client_batch_size=BATCH_LIMIT,
            payload_limit=PAYLOAD_LIMIT,
            health_check_period=1,
            health_check_timeout=10,
            graceful_shutdown_timeout=2,
        )
        serve.run(build_app(options), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, body: object, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=timeout)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert response.headers[REPLICA_HEADER]
    return body["message"]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def replica_actors() -> list[str]:
    """The names of the application's live replica actors (Ray's named actors, in Serve's namespace)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
    named = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        actor["name"] for actor in named if actor["namespace"] == "serve" and actor["name"].startswith(prefix)
    )


# -- the same vectors through every client -----------------------------------------------


def test_the_openai_client_gets_the_in_process_vectors(app: str, tiny_path: Path, embedder) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{app}/v1", api_key=KEY, max_retries=0)
    got = client.embeddings.create(model=str(tiny_path), input=TEXTS)
    np.testing.assert_allclose([item.embedding for item in got.data], embedder.embed_texts(TEXTS), atol=ATOL)
    assert [model.id for model in client.models.list().data] == [str(tiny_path)]


def test_an_image_and_an_interleaved_item_over_http_and_remote_embedder(app: str, embedder, photos) -> None:
    cat, coffee = photos["cat"], photos["coffee"]
    body = {
        "input": [
            {"type": "image_url", "image_url": {"url": data_uri(cat)}},
            [{"type": "image_url", "image_url": {"url": data_uri(coffee)}}, {"type": "text", "text": "my morning"}],
        ]
    }
    expected = embedder.embed([png(cat), Interleaved([png(coffee), "my morning"])])
    np.testing.assert_allclose(vectors(post(app, body)), expected, atol=ATOL)
    remote = RemoteEmbedder(app, api_key=KEY)
    assert remote.dimension == embedder.dimension
    items = [*TEXTS, png(cat), Interleaved([png(coffee), "my morning"])]
    np.testing.assert_allclose(remote.embed(items), embedder.embed(items), atol=ATOL)


def test_langchain_in_remote_mode(app: str, embedder) -> None:
    from langchain_e5v import E5VEmbeddings

    remote = E5VEmbeddings(base_url=app, api_key=KEY)
    np.testing.assert_allclose(remote.embed_documents(TEXTS), embedder.embed_texts(TEXTS), atol=ATOL)
    np.testing.assert_allclose(remote.embed_query(TEXTS[0]), embedder.embed_texts(TEXTS[:1])[0], atol=ATOL)


# -- replicas -----------------------------------------------------------------------------


def test_both_replicas_answer_a_burst(app: str, embedder) -> None:
    expected = embedder.embed_texts(TEXTS)
    seen: set[str] = set()
    for _ in range(10):  # bounded: Ray's router spreads concurrent requests, so two bursts suffice
        with ThreadPoolExecutor(PER_REPLICA) as pool:
            answers = list(pool.map(lambda _: post(app, {"input": TEXTS}), range(4 * PER_REPLICA)))
        for answer in answers:
            np.testing.assert_allclose(vectors(answer), expected, atol=ATOL)
            seen.add(answer.headers[REPLICA_HEADER])
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    assert {name.rsplit("#", 1)[-1] for name in replica_actors()} == seen


def test_every_answer_names_its_replica_and_one_request_id(app: str) -> None:
    for path in ("/health", "/ready", "/info", "/metrics", "/nothing-here"):
        answer = httpx.get(f"{app}{path}", timeout=30)
        assert answer.headers[REPLICA_HEADER], path
        assert len(answer.headers.get_list("x-request-id")) == 1, path
    assert httpx.get(f"{app}/ready", timeout=30).json() == {"status": "ready"}
    asked = httpx.get(f"{app}/health", headers={"x-request-id": "trace-42"}, timeout=30)
    assert asked.headers.get_list("x-request-id") == ["trace-42"]


def test_metrics_are_the_answering_replicas(app: str) -> None:
    post(app, {"input": ["counted"]})
    answer = httpx.get(f"{app}/metrics", timeout=30)
    assert answer.status_code == 200
    assert "e5v_requests_total" in answer.text
    assert "e5v_requests_in_flight" in answer.text


# -- the single server's HTTP answers ------------------------------------------------------


def test_bad_input_is_a_400_in_openais_shape(app: str) -> None:
    assert "item" in error(post(app, {"input": ["fine", ""]}), 400)
    error(post(app, {"input": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}), 400)
    bad = httpx.post(f"{app}/v1/embeddings", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    error(bad, 400)


def test_a_missing_or_wrong_key_is_a_401(app: str) -> None:
    assert "no API key was sent" in error(post(app, {"input": ["x"]}, key=None), 401)
    assert "not one of this server's keys" in error(post(app, {"input": ["x"]}, key="wrong"), 401)
    assert httpx.get(f"{app}/v1/models", timeout=30).status_code == 401


def test_too_many_items_or_bytes_is_a_413(app: str) -> None:
    assert f"limit of {BATCH_LIMIT}" in error(post(app, {"input": ["x"] * (BATCH_LIMIT + 1)}), 413)
    big = "x" * (PAYLOAD_LIMIT + 1)
    assert "payload limit" in error(post(app, {"input": [big]}), 413)


def test_requests_beyond_a_replicas_limit_are_429_with_retry_after(app: str) -> None:
    heavy = {"input": [f"{n} " + "a long note about many things " * 40 for n in range(BATCH_LIMIT)]}
    refused: list[httpx.Response] = []
    for _ in range(3):  # bounded: a burst of 5x the app's limits overflows them at once
        with ThreadPoolExecutor(10 * PER_REPLICA) as pool:
            answers = list(pool.map(lambda _: post(app, heavy, timeout=120), range(10 * PER_REPLICA)))
        assert {answer.status_code for answer in answers} <= {200, 429}
        refused = [answer for answer in answers if answer.status_code == 429]
        if refused:
            break
    assert refused, "no request was refused"
    assert "concurrent requests" in error(refused[0], 429)
    assert refused[0].headers.get("Retry-After")


# -- options ---------------------------------------------------------------------------------


def test_options_that_cannot_be_served_are_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"`chroma_url`; `db` /tmp/db is a folder one process only may open"):
        build_app(ServeOptions(db="/tmp/db", replicas=2))
    with pytest.raises(ConfigurationError, match="`db`"):
        build_app(ServeOptions(db="/tmp/db", autoscale=True, max_replicas=3))
    with pytest.raises(ConfigurationError, match="`min_replicas` 3 is over `max_replicas` 2"):
        build_app(ServeOptions(autoscale=True, min_replicas=3, max_replicas=2))
    build_app(ServeOptions(chroma_url="http://127.0.0.1:1", replicas=3))  # a Chroma server: any number


def test_the_builder_takes_serve_runs_string_arguments() -> None:
    application = build({"model": "tiny", "replicas": "3", "threads": "2", "api_keys": "a,b", "gpus_per_replica": "0"})
    deployment = application._bound_deployment  # what Ray deploys
    assert deployment.num_replicas == 3
    assert deployment.ray_actor_options == {"num_cpus": 2, "num_gpus": 0.0}
    assert deployment.logging_config["enable_access_log"] is False  # Ray's per-request log line: off by default
    assert build({"model": "tiny", "access_log": "true"})._bound_deployment.logging_config["enable_access_log"] is True
    scaled = ServeOptions(autoscale=True, min_replicas=0, max_replicas=4, target_ongoing_requests=3)
    assert scaled.deployment_options()["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 3.0,
    }
    with pytest.raises(ValueError, match="no_such_option"):
        build({"no_such_option": "1"})


# -- a replica dies ------------------------------------------------------------------------------


def test_a_killed_replica_is_replaced_and_no_request_hangs(app: str, embedder) -> None:
    expected = embedder.embed_texts(TEXTS)
    before = replica_actors()
    assert len(before) == 2

    def one(_: int) -> tuple[Any, np.ndarray | None]:
        try:
            answer = post(app, {"input": TEXTS}, timeout=60)  # every request bounded
        except httpx.TransportError as exc:
            return type(exc).__name__, None
        if answer.status_code == 408:
            # Ray hands a request whose replica died to another one, whose app never gets its body
            assert "body did not arrive within the server's body timeout" in error(answer, 408)
        return answer.status_code, vectors(answer) if answer.status_code == 200 else None

    remote = RemoteEmbedder(app, api_key=KEY, retries=10)
    with ThreadPoolExecutor(PER_REPLICA) as pool:
        burst = [pool.submit(one, n) for n in range(12 * PER_REPLICA)]
        wait(burst[:PER_REPLICA], timeout=120)
        ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
        through_remote = pool.submit(remote.embed_texts, TEXTS * 8)
        results = [future.result(timeout=180) for future in burst]
        np.testing.assert_allclose(through_remote.result(timeout=180), np.tile(expected, (8, 1)), atol=ATOL)
    for status, got in results:
        if status == 200:
            np.testing.assert_allclose(got, expected, atol=ATOL)
        else:
            assert status in (408, 429, 500, 502, 503, "RemoteProtocolError", "ReadError"), status
    assert sum(status == 200 for status, _ in results) >= len(results) // 2

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # bounded: Ray starts a new replica within seconds of the death
        now = replica_actors()
        if len(now) == 2 and before[0] not in now:
            break
        time.sleep(1)
    now = replica_actors()
    assert len(now) == 2 and before[0] not in now, now
    deadline = time.monotonic() + 240
    while serve.status().applications[APP_NAME].status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(1)
    later = [post(app, {"input": TEXTS}) for _ in range(8)]
    for answer in later:
        np.testing.assert_allclose(vectors(answer), expected, atol=ATOL)
    assert {answer.headers[REPLICA_HEADER] for answer in later} <= {name.rsplit("#", 1)[-1] for name in now}
