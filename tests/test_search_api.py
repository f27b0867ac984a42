"""The JSON endpoints of ``e5v serve --db`` (a real server subprocess, with a key) over
``examples/data`` indexed by the ``e5v index`` command with a tiny checkpoint."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from serving import KEY, start_server, stop

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
#: examples/data's photos and notes only: the counts below are theirs (PDFs have tests of their own)
ONLY_PHOTOS_AND_NOTES = shutil.ignore_patterns("*.pdf")
AUTH = {"Authorization": f"Bearer {KEY}"}


def e5v(*args: str | Path, key: bool = False) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name != "E5V_API_KEY"}
    env.update({"HF_HUB_OFFLINE": "1", **({"E5V_API_KEY": KEY} if key else {})})
    command = [sys.executable, "-m", "e5v", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    """examples/data, plus two photos the tests remove and change after indexing."""
    root = tmp_path_factory.mktemp("search-api") / "data"
    shutil.copytree(EXAMPLES, root, ignore=ONLY_PHOTOS_AND_NOTES)
    photos["rocket"].save(root / "gone.png")
    photos["camera"].save(root / "changed.png")
    return root


@pytest.fixture(scope="module")
def db(corpus: Path, tiny_path: Path) -> Path:
    db = corpus.parent / "db"
    done = e5v("index", corpus, "--model", tiny_path, "--db", db, "--quiet")
    assert done.returncode == 0, done.stderr
    return db


@pytest.fixture(scope="module")
def server(db: Path, tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path, "--db", str(db), "--payload-limit", "3000000")  # its --model: checked
    yield url
    stop(process)


@pytest.fixture(scope="module")
def store(db: Path, server: str):
    """The same collection, read in this process."""
    from e5v.collection.repository import Store

    return Store(db)


def search(url: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/search", json=body, headers=headers, timeout=60)


def hits(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["hits"]


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def by_path(store, name: str, passage: int | None = None) -> str:
    """The id of the record of the file ``name`` (of its ``passage`` for a text)."""
    from e5v.collection.records import record_id

    return record_id(str(next(Path(path) for path in store.paths() if Path(path).name == name)), passage)


# -- search --------------------------------------------------------------------------


def test_a_text_query_gets_ranked_hits_with_spans_and_metadata(server: str, store, embedder) -> None:
    found = hits(search(server, {"text": "how to make espresso", "k": 50}))
    assert len(found) == store.count()
    assert [hit["rank"] for hit in found] == list(range(1, len(found) + 1))
    scores = [hit["score"] for hit in found]
    assert scores == sorted(scores, reverse=True)
    expected = store.query(embedder.embed_texts(["how to make espresso"])[0], k=50)
    assert [hit["id"] for hit in found] == [hit.id for hit in expected]
    np.testing.assert_allclose(scores, [hit.score for hit in expected], atol=1e-4)
    for hit in found:
        assert "stamp" not in hit["metadata"] and "path" not in hit["metadata"]
        assert len(hit["metadata"]["sha256"]) == 64
        if hit["kind"] == "text":
            source = Path(hit["path"]).read_text()
            assert source[hit["start"] : hit["end"]] == hit["text"] and hit["passage"] >= 0
            assert hit["thumbnail"] is None
        else:
            assert hit["kind"] == "image" and hit["text"] is None and hit["start"] is None
            assert hit["thumbnail"] == f"/v1/records/{hit['id']}/thumbnail"


def test_an_indexed_photo_finds_itself_first(server: str, corpus: Path) -> None:
    plain = hits(search(server, {"image": b64(corpus / "chelsea.png"), "k": 3}))
    assert Path(plain[0]["path"]).name == "chelsea.png"
    assert plain[0]["score"] == pytest.approx(1.0, abs=1e-4)
    as_uri = hits(search(server, {"image": "data:image/png;base64," + b64(corpus / "chelsea.png"), "k": 3}))
    assert [hit["id"] for hit in as_uri] == [hit["id"] for hit in plain]


def test_a_composed_query_embeds_the_image_changed_by_the_text(server: str, corpus: Path, store, embedder) -> None:
    response = search(server, {"text": "make it a dog", "image": b64(corpus / "chelsea.png"), "k": 5})
    assert response.json()["query"] == "composed"
    vector = embedder.embed_composed([corpus / "chelsea.png"], ["make it a dog"])[0]
    assert [hit["id"] for hit in hits(response)] == [hit.id for hit in store.query(vector, k=5)]


def test_the_kind_filter(server: str) -> None:
    images = hits(search(server, {"text": "a photo", "k": 50, "kind": "image"}))
    texts = hits(search(server, {"text": "a photo", "k": 50, "kind": "text"}))
    assert {hit["kind"] for hit in images} == {"image"} and {hit["kind"] for hit in texts} == {"text"}
    assert len(images) == 7 and len(texts) == 5
    assert hits(search(server, {"text": "a photo", "kind": "video"})) == []


def test_more_like_this_searches_by_the_stored_vector_without_embedding(server: str, store) -> None:
    cat = by_path(store, "chelsea.png")
    embedded = metric(server, "e5v_items_embedded_total")
    response = search(server, {"like": cat, "k": 4})
    assert response.json()["query"] == "like"
    found = hits(response)
    assert metric(server, "e5v_items_embedded_total") == embedded  # nothing embedded
    [record] = store.get_records([cat], vectors=True)
    expected = [hit.id for hit in store.query(record.vector, k=5) if hit.id != cat][:4]
    assert [hit["id"] for hit in found] == expected and cat not in expected
    assert {hit["kind"] for hit in hits(search(server, {"like": cat, "kind": "text"}))} == {"text"}


def test_other_metadata_of_a_record_comes_with_its_hit(server: str, store) -> None:
    horse = by_path(store, "horse.png")
    store.collection.update(ids=[horse], metadatas=[{"page": 3, "source": "a scan"}])  # as another indexer may add
    found = hits(search(server, {"like": by_path(store, "chelsea.png"), "k": 50}))
    hit = next(hit for hit in found if hit["id"] == horse)
    assert hit["metadata"] == {"sha256": hit["metadata"]["sha256"], "page": 3, "source": "a scan"}
    assert hit["kind"] == "image" and hit["path"].endswith("horse.png")


def test_bad_queries_get_clear_errors(server: str) -> None:
    not_an_image = base64.b64encode(b"just some words, not a picture").decode()
    cases = [
        ({"image": not_an_image}, 400, "image: bytes of length 30 is not a readable image"),
        ({"image": "data:text/plain;base64,aGVsbG8="}, 400, "is not a data:image/"),
        ({"image": "not base64 at all!"}, 400, "image: it is not base64"),
        ({"text": "a <image> here"}, 400, "text: text"),
        ({}, 400, "the query is empty"),
        ({"text": "   "}, 400, "the query is empty"),
        ({"like": "x", "text": "a cat"}, 400, "leave out text and image"),
        ({"like": "no-such-record"}, 404, "no record 'no-such-record' in collection 'e5v'"),
        ({"text": "a cat", "k": 0}, 400, "k: Input should be greater than or equal to 1"),
        ({"text": "a cat", "k": 1000}, 400, "k: Input should be less than or equal to 200"),
        ({"text": "a cat", "colour": "blue"}, 400, "unknown fields ['colour']; see /docs"),
        ({"text": 5}, 400, "text: Input should be a valid string"),
    ]
    for body, status, expected in cases:
        message = error(search(server, body), status)
        assert expected in message, (body, message)
    big = {"image": "A" * 3_100_000}
    assert "payload limit of 3000000 bytes" in error(search(server, big), 413)


# -- thumbnails ----------------------------------------------------------------------


def test_a_thumbnail_is_a_small_jpeg_made_once(server: str, store) -> None:
    astronaut, coffee = by_path(store, "astronaut.jpg"), by_path(store, "coffee.jpg")
    made, kept = metric(server, "e5v_thumbnails_generated_total"), metric(server, "e5v_thumbnails_cache_hits_total")
    first = httpx.get(f"{server}/v1/records/{astronaut}/thumbnail", headers=AUTH)
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(first.content))
    assert image.format == "JPEG" and image.size == (400, 400)  # from 512 x 512
    again = httpx.get(f"{server}/v1/records/{astronaut}/thumbnail", headers=AUTH)
    assert again.content == first.content
    assert metric(server, "e5v_thumbnails_generated_total") == made + 1
    assert metric(server, "e5v_thumbnails_cache_hits_total") == kept + 1
    wide = Image.open(io.BytesIO(httpx.get(f"{server}/v1/records/{coffee}/thumbnail", headers=AUTH).content))
    assert wide.size == (400, 267)  # from 600 x 400
    assert metric(server, "e5v_thumbnails_generated_total") == made + 2


def test_thumbnails_only_of_indexed_image_files(server: str, store, corpus: Path, photos) -> None:
    def thumbnail(id_: str) -> httpx.Response:
        return httpx.get(f"{server}/v1/records/{id_}/thumbnail", headers=AUTH)

    assert "no record 'nope' in collection" in error(thumbnail("nope"), 404)
    note = by_path(store, "espresso.txt", passage=0)
    assert "is a text record; only image records and PDF pages have pictures" in error(thumbnail(note), 404)
    (corpus / "gone.png").unlink()
    assert "gone.png) is gone" in error(thumbnail(by_path(store, "gone.png")), 404)
    photos["coffee"].save(corpus / "changed.png")
    assert "has changed since it was indexed" in error(thumbnail(by_path(store, "changed.png")), 404)
    assert thumbnail("..%2F..%2Fetc%2Fpasswd").status_code == 404


# -- the collection, keys and the schema ---------------------------------------------


def test_the_collection_info(server: str, tiny_path: Path) -> None:
    info = httpx.get(f"{server}/v1/collection", headers=AUTH).json()
    assert info == {
        "name": "e5v",
        "model": str(tiny_path),
        "revision": None,
        "records": 12,
        "kinds": {"image": 7, "text": 5},
        "ready": True,
    }


def test_the_endpoints_need_the_key_and_the_page_holds_no_data(server: str, store) -> None:
    cat = by_path(store, "chelsea.png")
    for key in (None, "wrong"):
        assert "API key" in error(search(server, {"text": "a cat"}, key=key), 401)
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{server}/v1/collection", headers=headers).status_code == 401
        assert httpx.get(f"{server}/v1/records/{cat}/thumbnail", headers=headers).status_code == 401
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert "chelsea" not in page.text
    script = httpx.get(f"{server}/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "innerHTML" not in script.text and "insertAdjacentHTML" not in script.text
    assert httpx.get(f"{server}/static/../serving.py").status_code == 404


def test_the_openapi_schema_documents_the_search_endpoints(server: str) -> None:
    schema = httpx.get(f"{server}/openapi.json").json()
    body = schema["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"text", "image", "like", "k", "kind"} <= set(body["properties"])
    assert "/v1/collection" in schema["paths"]
    thumbnail = schema["paths"]["/v1/records/{record_id}/thumbnail"]["get"]
    assert "image/jpeg" in thumbnail["responses"]["200"]["content"]
    assert "SearchResponse" in schema["components"]["schemas"]


# -- the command line ----------------------------------------------------------------


def test_serve_db_refuses_what_it_cannot_serve(db: Path, tmp_path: Path) -> None:
    cases = [
        (("--db", db, "--host", "0.0.0.0"), "--host 0.0.0.0 needs a key"),
        (("--db", tmp_path / "nothing"), "no database at"),
        (("--db", db, "--collection", "other"), "no collection 'other'"),
        (("--db", db, "--model", tmp_path), "holds vectors of"),
    ]
    for options, expected in cases:
        done = e5v("serve", *options, "--port", "1")
        assert done.returncode == 2, (options, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("e5v serve: error:") and expected in lines[0], done.stderr


# -- PDF pages ---------------------------------------------------------------------------


def test_a_pdf_pages_thumbnail_is_its_rendering(tmp_path: Path, tiny_path: Path) -> None:
    """Every record of a PDF page gets the page drawn, made once; a text file's record none."""
    pytest.importorskip("pypdfium2")
    from e5v.collection.repository import Store, StoredRecord
    from e5v.errors import ThumbnailError
    from e5v.server.thumbnails import Thumbnails

    (tmp_path / "docs").mkdir()
    shutil.copy(EXAMPLES / "hubble-deep-field.pdf", tmp_path / "docs")
    db = tmp_path / "db"
    done = e5v("index", tmp_path / "docs", "--model", tiny_path, "--db", db, "--pdf-records", "image,text,interleaved")
    assert done.returncode == 0, done.stderr
    store = Store(db)
    records = store.get_records([id_ for id_, _ in store._metadatas()])
    made: list[int] = []
    thumbnails = Thumbnails(on_generate=lambda: made.append(1))
    drawn = list(records)
    assert {record.metadata["kind"] for record in drawn} == {"image", "text", "interleaved"}
    assert all(record.metadata.get("page") for record in drawn)
    for record in drawn:
        with Image.open(io.BytesIO(thumbnails.get(record))) as image:
            assert image.format == "JPEG" and max(image.size) <= thumbnails.size and image.getextrema() != ((0, 0),) * 3
    thumbnails.get(drawn[0])
    assert len(made) == len(drawn)  # the second request of a page came from memory
    (tmp_path / "note.txt").write_text("a note")
    note = StoredRecord("n", {"kind": "text", "path": str(tmp_path / "note.txt"), "sha256": "0" * 64})
    with pytest.raises(ThumbnailError, match="only image records and PDF pages have pictures"):
        thumbnails.get(note)


#: Every field a hit may carry, and every metadata key of one indexed by e5v: no bookkeeping.
API_HIT_FIELDS = {
    *("rank", "id", "score", "kind", "path", "passage", "start", "end", "text", "thumbnail", "metadata"),
    *("kinds", "pages", "file", "content"),
}
JSON_HIT_FIELDS = {"rank", "id", "score", "kind", "path", "page", "pages", "kinds", "passage", "start", "end", "text"}
PUBLIC_METADATA = {"sha256", "page"}


def test_hits_carry_no_bookkeeping_field(tmp_path: Path, tiny_path: Path) -> None:
    """Not in /v1/search's hits (as the page shows them), not in `e5v search --json`."""
    pytest.importorskip("pypdfium2")
    from e5v.collection.repository import Store
    from e5v.server.search import _hit

    (tmp_path / "docs").mkdir()
    shutil.copy(EXAMPLES / "hubble-deep-field.pdf", tmp_path / "docs")
    shutil.copy(EXAMPLES / "horse.png", tmp_path / "docs")
    shutil.copytree(EXAMPLES / "notes", tmp_path / "docs" / "notes")
    db = tmp_path / "db"
    done = e5v("index", tmp_path / "docs", "--model", tiny_path, "--db", db, "--pdf-records", "image,text,interleaved")
    assert done.returncode == 0, done.stderr
    store = Store(db)
    records = store.nearest(store.get_records([next(iter(store.stored().values())).id], vectors=True)[0].vector, 100)
    assert len(records) == store.count() and {record.metadata["kind"] for record in records} == {
        "image",
        "text",
        "interleaved",
    }
    for rank, record in enumerate(records, 1):
        shown = _hit(rank, record).model_dump()
        assert set(shown) == API_HIT_FIELDS
        assert set(shown["metadata"]) <= PUBLIC_METADATA
        assert ("page" in shown["metadata"]) == record.metadata["path"].endswith(".pdf")
    searched = e5v("search", "a galaxy", "-k", "100", "--json", "--group", "none", "--db", db)
    assert searched.returncode == 0, searched.stderr
    listed = json.loads(searched.stdout)
    assert len(listed) == len(records) and all(set(hit) <= JSON_HIT_FIELDS for hit in listed)
    assert {hit["page"] for hit in listed if hit["path"].endswith(".pdf")} == {1, 2}
