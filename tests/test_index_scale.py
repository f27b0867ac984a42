"""Scale-out indexing: ``e5v index --server URL --concurrency N --chroma-url URL`` embeds a large folder
through a real ``e5v serve`` (seen through a counting proxy) into a real ``chroma run``, N requests in
flight, and stores exactly what indexing with the model loaded in-process stores (ids, records,
metadata, vectors within 1e-5); a re-run sends no embedding request and skips every file; a changed
file is embedded again. Then ~2000 notes through ``e5v serve --replicas 2 --threads 1`` (a Ray
cluster of its own): exact, both replicas embedding, every file skipped on a re-run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scaling import CountingProxy, chroma_server, replicas
from serving import KEY, start_server, stop

from e5v.cli import main

chromadb = pytest.importorskip("chromadb")

TOLERANCE = 1e-5
NOTES = 300  # small text files; every fifth holds two passages
PHOTOS = ["cat", "astronaut", "camera"]
CONCURRENCY = 4
MANY = 2000  # notes for the replicas
WORDS = ["cat", "rocket", "camera", "coffee", "harbour", "violin", "glacier", "lantern", "meadow", "comet"]


def note(number: int) -> str:
    """A short note of its own; every fifth has a second paragraph, over --max-chars 80 together."""
    first = f"Note {number}: a {WORDS[number % 10]} near a {WORDS[(number * 7) % 10]} on day {number}."
    if number % 5:
        return first + "\n"
    return f"{first}\n\nLater that day {number * 3} people talked about the {WORDS[(number * 3) % 10]} at length.\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, photo_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("scale") / "corpus"
    for number in range(NOTES):
        part = root / f"part{number % 7}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"note{number:04d}.txt").write_text(note(number))
    for name in PHOTOS:
        shutil.copy(photo_dir / f"{name}.png", root / f"{name}.png")
    return root


@pytest.fixture(scope="module")
def proxy(tiny_path: Path) -> Iterator[CountingProxy]:
    process, url = start_server(tiny_path)
    try:
        with CountingProxy(url) as counting:
            yield counting
    finally:
        stop(process)


@pytest.fixture(scope="module")
def chroma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with chroma_server(tmp_path_factory.mktemp("chroma")) as url:
        yield url


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory, folder: Path, tiny_path: Path) -> dict[str, Any]:
    """The folder indexed with the model loaded in-process, as the reference."""
    db = tmp_path_factory.mktemp("reference") / "db"
    assert main(["index", str(folder), "--db", str(db), "--model", str(tiny_path), "--max-chars", "80", "-q"]) == 0
    return records(chromadb.PersistentClient(path=str(db)), "e5v")


def records(client: Any, name: str) -> dict[str, Any]:
    """``id -> (metadata, document, vector)`` of a collection."""
    got = client.get_collection(name).get(include=["metadatas", "documents", "embeddings"])
    return {
        id_: (metadata, document, np.asarray(vector))
        for id_, metadata, document, vector in zip(got["ids"], got["metadatas"], got["documents"], got["embeddings"])
    }


def served(chroma: str, name: str) -> dict[str, Any]:
    host, port = chroma.removeprefix("http://").split(":")
    settings = chromadb.Settings(anonymized_telemetry=False)
    return records(chromadb.HttpClient(host=host, port=int(port), settings=settings), name)


def index(capsys: pytest.CaptureFixture[str], folder: Path, *options: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["index", str(folder), "--max-chars", "80", "-q", *options])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture()
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E5V_API_KEY", KEY)


def same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(got) == sorted(expected)
    for id_, (metadata, document, vector) in expected.items():
        assert got[id_][0] == metadata, id_
        assert got[id_][1] == document, id_
        np.testing.assert_allclose(got[id_][2], vector, rtol=0, atol=TOLERANCE, err_msg=id_)


def test_a_folder_through_a_server_with_requests_in_flight_is_indexed_exactly_and_incrementally(
    capsys: pytest.CaptureFixture[str],
    key: None,
    folder: Path,
    proxy: CountingProxy,
    chroma: str,
    in_process: dict[str, Any],
) -> None:
    files = NOTES + len(PHOTOS)
    records_count = NOTES + NOTES // 5 + len(PHOTOS)
    remote = ["--server", proxy.url, "--concurrency", str(CONCURRENCY), "--chroma-url", chroma, "--collection", "big"]
    proxy.reset()
    status, out, err = index(capsys, folder, *remote)
    assert (status, err) == (0, "")
    assert out.startswith(f"indexed {files} files ({records_count} records), skipped 0 unchanged, failed 0")
    assert len(in_process) == records_count
    same(served(chroma, "big"), in_process)
    assert 1 < proxy.peak <= CONCURRENCY  # the server had requests side by side, never more than asked for
    assert proxy.embeddings >= 2 * CONCURRENCY

    proxy.reset()
    status, out, err = index(capsys, folder, *remote)
    assert (status, err) == (0, "")
    assert out.startswith(f"indexed 0 files (0 records), skipped {files} unchanged, failed 0")
    assert proxy.embeddings == 0

    changed = folder / "part3" / "note0010.txt"
    changed.write_text("Note 10, rewritten: a lantern over the glacier.\n")
    proxy.reset()
    status, out, _ = index(capsys, folder, *remote)
    assert status == 0 and out.startswith(f"indexed 1 file (1 record), skipped {files - 1} unchanged")
    assert proxy.embeddings == 1
    after = served(chroma, "big")
    assert len(after) == records_count - 1  # its second passage is gone with its old text
    texts = [document for metadata, document, _ in after.values() if metadata["path"] == str(changed)]
    assert texts == ["Note 10, rewritten: a lantern over the glacier."]


def test_concurrency_without_a_server_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], folder: Path, tiny_path: Path, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    status, out, err = index(capsys, folder, "--model", str(tiny_path), "--db", str(db), "--concurrency", "4")
    assert status == 2 and out == ""
    assert err.splitlines() == [
        "e5v index: error: --concurrency is the number of requests in flight to an `e5v serve`, so it needs "
        "--server URL; leave it out to index with the model loaded here"
    ]
    assert not db.exists()


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("many") / "corpus"
    for number in range(MANY):
        part = root / f"part{number % 20}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"note{number:05d}.txt").write_text(
            f"Note {number}: a {WORDS[number % 10]} seen {number // 10} times.\n"
        )
    return root


def test_a_large_folder_through_two_replicas_is_indexed_exactly_by_both(
    capsys: pytest.CaptureFixture[str],
    key: None,
    many: Path,
    tiny_path: Path,
    chroma: str,
    tmp_path: Path,
) -> None:
    pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'e5v[ray]')")
    reference = tmp_path / "db"
    assert main(["index", str(many), "--db", str(reference), "--model", str(tiny_path), "--max-chars", "80", "-q"]) == 0
    expected = records(chromadb.PersistentClient(path=str(reference)), "e5v")
    assert len(expected) == MANY
    with replicas(tiny_path, 2, {**os.environ, "E5V_API_KEY": KEY}) as url, CountingProxy(url) as proxy:
        remote = [
            "--server",
            proxy.url,
            "--concurrency",
            str(CONCURRENCY),
            "--chroma-url",
            chroma,
            "--collection",
            "many",
        ]
        status, out, err = index(capsys, many, *remote)
        assert (status, err) == (0, "")
        assert out.startswith(f"indexed {MANY} files ({MANY} records), skipped 0 unchanged, failed 0")
        assert len(proxy.replicas) == 2, proxy.replicas  # x-e5v-replica: both embedded
        assert sum(proxy.replicas.values()) == proxy.embeddings and 1 < proxy.peak <= CONCURRENCY
        proxy.reset()
        status, out, err = index(capsys, many, *remote)
        assert (status, err) == (0, "") and proxy.embeddings == 0
        assert out.startswith(f"indexed 0 files (0 records), skipped {MANY} unchanged, failed 0")
    same(served(chroma, "many"), expected)


def test_bad_files_through_a_server_cost_a_few_requests_and_fail_as_in_process(
    capsys: pytest.CaptureFixture[str],
    key: None,
    proxy: CountingProxy,
    chroma: str,
    tiny_path: Path,
    tmp_path: Path,
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for number in range(120):
        (corpus / f"note{number:03d}.txt").write_text(note(number))
    bad = [corpus / "note017.txt", corpus / "note088.txt"]
    for path in bad:
        path.write_text("A note about the <image> placeholder.\n")
    options = ["--batch-size", "4"]  # groups of 16 records, 4 requests each
    status, out, expected_err = index(capsys, corpus, "--db", str(tmp_path / "db"), "--model", str(tiny_path), *options)
    assert status == 1 and ", failed 2" in out
    expected = records(chromadb.PersistentClient(path=str(tmp_path / "db")), "e5v")
    proxy.reset()
    remote = ["--server", proxy.url, "--concurrency", str(CONCURRENCY), "--chroma-url", chroma, "--collection", "bad"]
    status, out, err = index(capsys, corpus, *remote, *options)
    assert status == 1 and ", failed 2" in out
    assert sorted(err.splitlines()) == sorted(expected_err.splitlines())
    assert [line.split(":")[1].strip() for line in sorted(err.splitlines())] == [str(path) for path in bad]
    same(served(chroma, "bad"), expected)
    requests = -(-len(expected) // 4)  # ceil: the good records' requests
    # each bad file: its group's failed call, itself alone, its group again (a file at a time: 14 calls a group)
    assert proxy.embeddings <= requests + len(bad) * (4 + 1 + 4)
