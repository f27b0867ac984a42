"""``e5v serve`` as a real subprocess on a loopback port, through real clients: the
``openai`` package, LangChain's ``OpenAIEmbeddings``, and httpx for multimodal items."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import KEY, free_port, start_server, stop

from e5v import Composed, Interleaved
from e5v.core.inputs import text_request

ATOL = 1e-5


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path, "--max-client-batch-size", "32", "--payload-limit", "3000000")
    yield url
    stop(process)


def post(url: str, body: object, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=timeout)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body["message"]


# -- real clients -----------------------------------------------------------------------


def test_the_openai_client_gets_the_in_process_vectors(server: str, tiny_path: Path, embedder) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEY)
    texts = ["a photo of a cat", "espresso brewing", "a photo of a cat"]
    expected = embedder.embed_texts(texts)
    tokens = sum(embedder.token_counts([*map(text_request, texts, range(3))], embedder.prompt_bodies()))
    default = client.embeddings.create(model=str(tiny_path), input=texts)  # the client asks for base64 and decodes
    as_floats = client.embeddings.create(model=str(tiny_path), input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model=str(tiny_path), input=texts, encoding_format="base64")
    decoded = [np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") for item in as_base64.data]  # type: ignore[arg-type]
    for got in (default, as_floats):
        assert [item.index for item in got.data] == [0, 1, 2]
        np.testing.assert_allclose(np.asarray([item.embedding for item in got.data]), expected, atol=ATOL)
        assert got.usage.prompt_tokens == got.usage.total_tokens == tokens
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray([item.embedding for item in as_floats.data], "<f4"))
    single = client.embeddings.create(model=str(tiny_path), input="a photo of a cat")
    np.testing.assert_allclose(single.data[0].embedding, expected[0], atol=ATOL)
    assert [model.id for model in client.models.list().data] == [str(tiny_path)]


def test_langchains_openai_embeddings_work_against_it(server: str, tiny_path: Path, embedder) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=str(tiny_path),
        base_url=f"{server}/v1",
        api_key=KEY,
        check_embedding_ctx_length=False,  # type: ignore[arg-type]
    )
    texts = ["a note about cats", "a note about coffee"]
    np.testing.assert_allclose(embeddings.embed_documents(texts), embedder.embed_texts(texts), atol=ATOL)
    np.testing.assert_allclose(embeddings.embed_query(texts[0]), embedder.embed_texts(texts[:1])[0], atol=ATOL)


def test_multimodal_items_in_one_list(server: str, embedder, photos) -> None:
    cat, coffee = photos["cat"], photos["coffee"]
    body = {
        "input": [
            "a cat",
            {"type": "text", "text": "a cup"},
            {"type": "image_url", "image_url": {"url": data_uri(cat)}},
            [{"type": "image_url", "image_url": {"url": data_uri(coffee)}}, {"type": "text", "text": "my morning"}],
            {"type": "composed", "image_url": {"url": data_uri(cat)}, "text": "make it a dog"},
        ]
    }
    got = vectors(post(server, body))
    expected = embedder.embed(
        ["a cat", "a cup", png(cat), Interleaved([png(coffee), "my morning"]), Composed(png(cat), "make it a dog")]
    )
    np.testing.assert_allclose(got, expected, atol=ATOL)
    gallery = vectors(post(server, {**body, "input": body["input"][2:3], "prompts": "cirr"}))
    np.testing.assert_allclose(gallery[0], embedder.embed([png(cat)], prompts="cirr")[0], atol=ATOL)


def test_64_concurrent_requests_of_mixed_kinds(server: str, embedder, photos) -> None:
    cat = photos["cat"]
    kinds = [
        ("text", lambda n: [f"note number {n}", "a cat"], lambda n: [f"note number {n}", "a cat"]),
        ("image", lambda n: [{"type": "image_url", "image_url": {"url": data_uri(cat)}}], lambda n: [png(cat)]),
        (
            "composed",
            lambda n: [{"type": "composed", "image_url": {"url": data_uri(cat)}, "text": f"add {n} hats"}],
            lambda n: [Composed(png(cat), f"add {n} hats")],
        ),
    ]

    def one(n: int) -> tuple[np.ndarray, np.ndarray]:
        _, sent, local = kinds[n % len(kinds)]
        return vectors(post(server, {"input": sent(n), "encoding_format": "float"})), embedder.embed(local(n))

    def rounds() -> tuple[float, float]:
        lines = httpx.get(f"{server}/metrics").text.splitlines()
        count, total = (
            next(line for line in lines if line.startswith(name))
            for name in ("e5v_round_requests_count", "e5v_round_requests_sum")
        )
        return float(count.split()[-1]), float(total.split()[-1])

    before = rounds()
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    for got, expected in results:
        np.testing.assert_allclose(got, expected, atol=ATOL)
    after = rounds()
    assert after[1] - before[1] >= 64  # every request went through the scheduler (its items may span rounds)
    assert after[0] - before[0] < 64, "concurrent requests were embedded together, in fewer rounds"


# -- limits, keys and bad input -----------------------------------------------------------


def test_keys_limits_and_bad_input_get_clear_errors(server: str) -> None:
    from test_inputs import png_header_claiming

    assert "API key" in error(post(server, {"input": "x"}, key=None), 401)
    assert "API key" in error(post(server, {"input": "x"}, key="wrong"), 401)
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert "over the server's limit of 32" in error(post(server, {"input": ["x"] * 33}), 413)
    big = {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 3_100_000}}]}
    assert "payload limit of 3000000 bytes" in error(post(server, big), 413)

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    malformed = httpx.post(f"{server}/v1/embeddings", content=b'{"input": [', headers=headers)
    assert "not valid JSON" in error(malformed, 400)
    bomb = "data:image/png;base64," + base64.b64encode(png_header_claiming(50_000, 50_000)).decode()
    text_uri = "data:text/plain;base64,aGVsbG8="
    cases = [
        ({"input": 5}, "input must be a string or a non-empty list"),
        ({"input": []}, "non-empty list"),
        ({}, "no 'input'"),
        ({"input": ["ok", 7]}, "item 1: an item must be a string"),
        ({"input": [[1, 2, 3]]}, "item 0: token ids are not accepted"),
        (
            {"input": ["ok", {"type": "image_url", "image_url": {"url": text_uri}}]},
            "item 1: str 'data:text/plain;base64,aGVsbG8=' is not a data:image/",
        ),
        ({"input": [{"type": "image_url", "image_url": {"url": bomb}}]}, "item 0: bytes of length"),
        ({"input": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}, "never reads its own files"),
        ({"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}, "not a readable"),
        ({"input": ["a <image> here"]}, "item 0: text"),
        ({"input": "x", "dimensions": 256}, "dimensions is not supported"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format must be 'float' or 'base64', got 'int8'"),
        ({"input": "x", "prompts": "nope"}, "prompts must be 'cirr', 'e5v', 'e5v-sts' or 'llava-next-base'"),
        ({"input": "x", "colour": "blue"}, "unknown fields ['colour']"),
    ]
    for body, expected in cases:
        message = error(post(server, body), 400)
        assert expected in message, (body, message)
    assert "claims more pixels than the cap" in error(post(server, cases[6][0]), 400)
    assert "is not served here" in error(post(server, {"input": "x", "model": "text-embedding-3-small"}), 404)
    assert vectors(post(server, {"input": ["still serving", "yes"]})).shape[0] == 2


def test_a_remote_image_url_never_opens_a_connection(server: str, tiny_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/cat.png"
    body = {"input": [{"type": "image_url", "image_url": {"url": url}}]}
    assert "remote image URLs are refused by this server" in error(post(server, body), 400)
    process, allowed = start_server(tiny_path, "--allow-remote-images")
    try:
        message = error(post(allowed, body), 400)  # allowed, but never to a loopback address
        assert "127.0.0.1" in message
    finally:
        stop(process)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()


def test_over_the_concurrency_limit_is_429_with_retry_after(tiny_path: Path) -> None:
    process, url = start_server(tiny_path, "--max-concurrent-requests", "1", "--no-batching")
    try:
        statuses: list[httpx.Response] = []
        lock = threading.Lock()

        def one(n: int) -> None:
            response = post(url, {"input": [f"text {n} {i}" for i in range(64)]})
            with lock:
                statuses.append(response)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(8)))
        refused = [response for response in statuses if response.status_code == 429]
        assert refused and all(response.headers["retry-after"] == "1" for response in refused)
        assert "limit of 1 concurrent requests" in refused[0].json()["error"]["message"]
        assert any(response.status_code == 200 for response in statuses)
        assert post(url, {"input": "after"}).status_code == 200
    finally:
        stop(process)


def test_health_ready_info_metrics_and_the_schema(server: str, tiny_path: Path, embedder) -> None:
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server}/ready").json() == {"status": "ready"}
    info = httpx.get(f"{server}/info").json()
    assert info["model"] == str(tiny_path) and info["dimension"] == embedder.dimension
    assert info["max_client_batch_size"] == 32 and info["payload_limit"] == 3_000_000
    metrics = httpx.get(f"{server}/metrics").text
    for name in (
        "e5v_requests_total",
        "e5v_items_embedded_total",
        "e5v_tokens_embedded_total",
        "e5v_round_items_bucket",
        "e5v_round_duration_seconds_bucket",
        "e5v_queue_items",
        "e5v_request_duration_seconds_bucket",
    ):
        assert name in metrics
    assert 'e5v_requests_total{status="200"}' in metrics
    schema = httpx.get(f"{server}/openapi.json").json()
    request = schema["components"]["schemas"]["EmbeddingRequest"]
    assert set(request["properties"]) >= {"input", "model", "encoding_format", "dimensions", "prompts"}
    assert json.dumps(schema).count("#/components/schemas/ComposedItem") >= 1


# -- RemoteEmbedder ---------------------------------------------------------------------


def test_the_remote_embedder_equals_the_in_process_one(server: str, embedder, photos, photo_dir: Path) -> None:
    from e5v import Embedder, RemoteEmbedder

    remote = RemoteEmbedder(server, api_key=KEY)
    assert isinstance(remote, Embedder) and isinstance(embedder, Embedder)
    assert (remote.dimension, remote.model_name) == (embedder.dimension, embedder.model_name)
    cat_file = photo_dir / "cat.png"
    texts = [f"text number {n}" for n in range(40)]  # over the server's 32 a request: two requests
    np.testing.assert_allclose(remote.embed_texts(texts), embedder.embed_texts(texts), atol=ATOL)
    images = [cat_file, str(cat_file), photos["coffee"], np.asarray(photos["camera"]), cat_file.read_bytes()]
    np.testing.assert_allclose(remote.embed_images(images), embedder.embed_images(images), atol=ATOL)
    np.testing.assert_allclose(
        remote.embed_composed([cat_file], ["make it a dog"]),
        embedder.embed_composed([cat_file], ["make it a dog"]),
        atol=ATOL,
    )
    mixed = ["a cat", cat_file, Interleaved([photos["cat"], "on a sofa"]), Composed(photos["coffee"], "in a red cup")]
    np.testing.assert_allclose(remote.embed(mixed), embedder.embed(mixed), atol=ATOL)
    np.testing.assert_allclose(
        remote.embed([cat_file], prompts="cirr"), embedder.embed([cat_file], prompts="cirr"), atol=ATOL
    )

    from e5v.errors import ConfigurationError, EmbeddingError, InvalidInputError

    with pytest.raises(InvalidInputError, match=r"^item 35: .*reserved") as raised:
        remote.embed_texts([*texts[:35], "an <image> here", *texts[:4]])  # in the second request
    assert raised.value.index == 35
    with pytest.raises(InvalidInputError, match=r"^item 1: image file .*cannot be read"):
        remote.embed_images([cat_file, photo_dir / "missing.png"])
    with pytest.raises(ConfigurationError, match="refused the API key"):
        RemoteEmbedder(server, api_key="wrong").embed_texts(["x"])
    with pytest.raises(EmbeddingError, match="cannot reach the e5v server"):
        RemoteEmbedder(f"http://127.0.0.1:{free_port()}", retries=1).embed_texts(["x"])


def test_a_client_that_disconnects_has_its_queued_items_dropped(server: str) -> None:
    def items_sum() -> float:
        lines = httpx.get(f"{server}/metrics").text.splitlines()
        return float(next(line for line in lines if line.startswith("e5v_round_items_sum")).split()[-1])

    before = items_sum()
    long_texts = [" ".join(f"word{n}_{i}" for i in range(700)) for n in range(32)]  # a round each
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, server, {"input": long_texts})  # shares the rounds, in turn
        time.sleep(0.3)
        with pytest.raises(httpx.TimeoutException):
            post(server, {"input": [text + " again" for text in long_texts]}, timeout=0.5)  # then gone
        assert first.result().status_code == 200
    time.sleep(0.5)
    assert items_sum() - before < 64  # the second request's items still waiting never reached the model


def test_the_serve_benchmark_runs_and_reports_every_figure(tiny_path: Path) -> None:
    command = [sys.executable, "-m", "e5v", "bench-serve", "--model", str(tiny_path), "--texts", "4"]
    result = subprocess.run(
        [*command, "--repeats", "1", "--requests", "1", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {(row["clients"], row["batching"]) for row in report["clients"]} == {
        (clients, batching) for clients in (1, 4, 8) for batching in (True, False)
    }
    for key in ("in_process_gain", "server_gain", "server_gain_share", "http_ratio"):
        assert report[key] > 0
    assert 0 < report["http_model_s"] < report["http_batch_s"] and 0 < report["http_overhead"] < 1


# -- the CLI through a server -----------------------------------------------------------


def test_index_search_and_embed_through_the_server(
    server: str, tiny_path: Path, embedder, photo_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import chromadb

    from e5v.cli import main

    monkeypatch.setenv("E5V_API_KEY", KEY)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "note.md").write_text("A note about cats and sofas.", encoding="utf-8")
    shutil.copy(photo_dir / "cat.png", folder / "cat.png")
    db = tmp_path / "db"
    assert main(["index", str(folder), "--db", str(db), "--server", server]) == 0
    assert capsys.readouterr().out.startswith("indexed 2 files (2 records)")
    got = chromadb.PersistentClient(path=str(db)).get_collection("e5v").get(include=["metadatas", "embeddings"])
    by_path = {m["path"]: vector for m, vector in zip(got["metadatas"], got["embeddings"])}
    np.testing.assert_allclose(by_path[str(folder / "cat.png")], embedder.embed([folder / "cat.png"])[0], atol=ATOL)
    note = embedder.embed_texts(["A note about cats and sofas."])[0]
    np.testing.assert_allclose(by_path[str(folder / "note.md")], note, atol=ATOL)

    assert main(["search", "A note about cats and sofas.", "--db", str(db), "--server", server, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == str(folder / "note.md") and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    out = tmp_path / "vectors.npy"
    assert main(["embed", "a photo of a cat", str(folder / "cat.png"), "--server", server, "-o", str(out)]) == 0
    np.testing.assert_allclose(np.load(out), embedder.embed(["a photo of a cat", folder / "cat.png"]), atol=ATOL)

    assert main(["search", "x", "--db", str(db), "--server", server, "--device", "cpu"]) == 2
    assert "--server embeds with the server's model, so --device cannot be set" in capsys.readouterr().err
    monkeypatch.setenv("E5V_API_KEY", "wrong")
    assert main(["embed", "x", "--server", server]) == 2
    assert "refused the API key" in capsys.readouterr().err
