"""chromadb_e5v with a real Chroma server (``chroma run``) on the loopback, through HttpClient."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

chromadb = pytest.importorskip("chromadb")

from chromadb_e5v import E5VEmbeddingFunction, E5VImageLoader  # noqa: E402
from e5v import E5VEmbedder  # noqa: E402

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def chroma_cli() -> str:
    beside = Path(sys.executable).parent / "chroma"
    found = str(beside) if beside.exists() else shutil.which("chroma")
    assert found, "the `chroma` CLI of the chromadb package is not installed next to this Python"
    return found


def connect(port: int):
    return chromadb.HttpClient(host=HOST, port=port, settings=chromadb.Settings(anonymized_telemetry=False))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A ``chroma run`` server on a free loopback port; stopped when the module ends."""
    root = tmp_path_factory.mktemp("chroma-server")
    port = free_port()
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [chroma_cli(), "run", "--path", str(root / "db"), "--host", HOST, "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"chroma run exited with {process.returncode}:\n{(root / 'server.log').read_text()[-3000:]}"
                )
            try:
                connect(port).heartbeat()
                break
            except Exception:
                if time.monotonic() > deadline:
                    pytest.fail(f"no heartbeat from chroma run on port {port} within {STARTUP_TIMEOUT_S:.0f} s")
                time.sleep(0.25)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        log.close()


def ranked(query: np.ndarray, ids: list[str], vectors: np.ndarray) -> list[str]:
    return [ids[i] for i in np.argsort(-(vectors @ query), kind="stable")]


def test_images_and_texts_through_a_server_and_a_fresh_client(
    server: int, tiny_path: Path, embedder: E5VEmbedder, photos: dict[str, Image.Image], photo_dir: Path
) -> None:
    ef = E5VEmbeddingFunction(str(tiny_path), batch_size=4)
    collection = connect(server).create_collection("media", embedding_function=ef, data_loader=E5VImageLoader())
    collection.add(ids=["cat", "rocket"], images=[np.asarray(photos["cat"]), np.asarray(photos["rocket"])])
    collection.add(ids=["astronaut"], uris=[str(photo_dir / "astronaut.png")])
    collection.add(ids=["doc"], documents=["A cat sleeps on a warm sofa."])
    ids = ["cat", "rocket", "astronaut", "doc"]
    expected = embedder.embed(
        [photos["cat"], photos["rocket"], photo_dir / "astronaut.png", "A cat sleeps on a warm sofa."]
    )

    stored = collection.get(ids=ids, include=["embeddings"])
    np.testing.assert_allclose(np.asarray(stored["embeddings"]), expected, atol=1e-6, rtol=0)
    text_query = embedder.embed_texts(["a sleeping cat"])[0]
    by_text = collection.query(query_texts=["a sleeping cat"], n_results=4)["ids"][0]
    assert by_text == ranked(text_query, ids, expected)
    assert collection.query(query_images=[np.asarray(photos["rocket"])], n_results=1)["ids"] == [["rocket"]]

    reopened = connect(server).get_collection("media", data_loader=E5VImageLoader())  # no function passed
    assert reopened.configuration_json["embedding_function"]["name"] == "e5v"
    assert reopened.configuration_json["embedding_function"]["config"] == ef.get_config()
    assert reopened.query(query_texts=["a sleeping cat"], n_results=4)["ids"][0] == by_text
    assert reopened.query(query_uris=[str(photo_dir / "astronaut.png")], n_results=1)["ids"] == [["astronaut"]]
    reopened.add(ids=["coffee"], uris=[str(photo_dir / "coffee.png")])
    coffee = reopened.get(ids=["coffee"], include=["embeddings"])["embeddings"]
    np.testing.assert_allclose(np.asarray(coffee), embedder.embed_images([photo_dir / "coffee.png"]), atol=1e-6, rtol=0)
    assert reopened.count() == 5


def test_cli_indexes_and_searches_on_the_server(
    server: int, tiny_path: Path, photo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from e5v.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("cat", "rocket", "coffee"):
        shutil.copy(photo_dir / f"{name}.png", corpus / f"{name}.png")
    (corpus / "note.md").write_text("A cat sleeps on a warm sofa.\n")
    url = f"http://{HOST}:{server}"
    common = ["--chroma-url", url, "--collection", "cli-media"]
    assert main(["index", str(corpus), "--model", str(tiny_path), "--quiet", *common]) == 0
    capsys.readouterr()
    assert main(["search", "--image", str(corpus / "rocket.png"), "--json", "-k", "4", *common]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"].endswith("rocket.png") and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert {hit["kind"] for hit in hits} == {"image", "text"}
    stored = connect(server).get_collection("cli-media").count()
    assert stored == 4
