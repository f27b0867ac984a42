"""Filters, results grouped by PDF page, the files hits lead to, and pictures for RAG: through
the real ``e5v search`` command and a real ``e5v serve --db`` subprocess (with a key), over
examples/data and a second PDF, indexed by ``e5v index`` with a tiny checkpoint."""

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
import pytest
from pdfs import write_report
from PIL import Image
from serving import KEY, start_server, stop

pytest.importorskip("pypdfium2")
pytest.importorskip("fpdf")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
AUTH = {"Authorization": f"Bearer {KEY}"}


def e5v(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name != "E5V_API_KEY"}
    command = [sys.executable, "-m", "e5v", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=300, cwd=cwd
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    root = tmp_path_factory.mktemp("documents") / "data"
    shutil.copytree(EXAMPLES, root)
    write_report(root / "report.pdf", photos["cat"])
    return root


@pytest.fixture(scope="module")
def db(corpus: Path, tiny_path: Path) -> Path:
    db = corpus.parent / "db"
    done = e5v("index", corpus, "--model", tiny_path, "--db", db, "--quiet")
    assert done.returncode == 0, done.stderr
    return db


def search(db: Path, *options: str, cwd: Path | None = None) -> list[dict]:
    done = e5v("search", *options, "--json", "--db", db, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def refused(db: Path, *options: str) -> str:
    done = e5v("search", "a cat", *options, "--db", db)
    assert done.returncode == 2 and done.stdout == "", (options, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e5v search: error: "), done.stderr
    return lines[0]


# -- grouping ----------------------------------------------------------------------------


def test_a_pdf_collection_groups_by_page_and_fuses_the_kinds(db: Path, corpus: Path) -> None:
    hits = search(db, "a galaxy far away", "-k", "50")
    keys = [(hit["path"], hit.get("page")) for hit in hits]
    assert len(keys) == len(set(keys))  # one hit per page (and per other file)
    pdf = [hit for hit in hits if hit["path"].endswith(".pdf")]
    assert {(Path(hit["path"]).name, hit["page"]) for hit in pdf} == {
        ("hubble-deep-field.pdf", 1),
        ("hubble-deep-field.pdf", 2),
        ("report.pdf", 1),
        ("report.pdf", 2),
    }
    for hit in hits:
        assert Path(hit["path"]).is_absolute() and Path(hit["path"]).is_file()
        kinds = hit["kinds"]
        assert set(kinds) <= {"image", "text", "interleaved"} and kinds
        terms = [1 / (60 + match["rank"]) for match in kinds.values()]
        if hit["path"].endswith(".pdf"):
            assert hit["score"] == pytest.approx(sum(terms), abs=1e-6)
        else:  # a photo or a note cannot hold the other kind: its own term counts for it
            assert len(terms) == 1 and hit["score"] == pytest.approx(2 * terms[0], abs=1e-6)
        assert hit["id"] in {match["id"] for match in kinds.values()}
    for hit in pdf:
        assert hit["pages"] == 2 and set(hit["kinds"]) == {"image", "text"}
    scores = [hit["score"] for hit in hits]
    assert scores == sorted(scores, reverse=True)
    notes = [hit for hit in hits if hit["path"].endswith((".txt", ".md"))]
    assert len(notes) == 4 and all(hit["text"] and hit["passage"] == 0 for hit in notes)


def test_an_image_query_finds_that_photo_first_among_pages(db: Path, corpus: Path) -> None:
    hits = search(db, "--image", str(corpus / "chelsea.png"), "-k", "3")
    assert hits[0]["path"] == str(corpus / "chelsea.png") and hits[0]["kinds"]["image"]["score"] == pytest.approx(1.0)
    assert hits[0]["score"] == pytest.approx(2 / 61, abs=1e-6)


def test_group_file_and_group_none(db: Path, store_query) -> None:
    by_file = search(db, "a galaxy", "-k", "50", "--group", "file")
    assert len({hit["path"] for hit in by_file}) == len(by_file) == 11  # 5 photos, 4 notes, 2 PDFs
    records = search(db, "a galaxy", "-k", "50", "--group", "none")
    assert [hit["id"] for hit in records] == [hit.id for hit in store_query("a galaxy", 50)]
    assert all("kinds" not in hit and "pages" not in hit for hit in records)


@pytest.fixture(scope="module")
def store_query(db: Path, embedder):
    from e5v.collection.repository import Store

    store = Store(db)
    return lambda text, k: store.query(embedder.embed_texts([text])[0], k=k)


def test_passage_numbers_read_the_same_in_the_table_and_json(db: Path) -> None:
    hits = search(db, "espresso", "-k", "3", "--where", "path~notes")
    done = e5v("search", "espresso", "-k", "3", "--where", "path~notes", "--db", db)
    rows = done.stdout.splitlines()[1:]
    assert len(rows) == len(hits) == 3
    for row, hit in zip(rows, hits):
        assert f" #{hit['passage']} " in row and row.split()[3] == hit["path"]


# -- filters -------------------------------------------------------------------------------


def test_where_filters(db: Path, corpus: Path) -> None:
    notes = search(db, "a cat", "-k", "50", "--where", "path~notes")
    assert len(notes) == 4 and all("/notes/" in hit["path"] for hit in notes)
    relative = search(db, "a cat", "-k", "50", "--where", "path^=notes/", cwd=corpus)
    assert [hit["id"] for hit in relative] == [hit["id"] for hit in notes]
    second = search(db, "a cat", "-k", "50", "--where", "page=2")
    assert {(Path(hit["path"]).name, hit["page"]) for hit in second} == {
        ("hubble-deep-field.pdf", 2),
        ("report.pdf", 2),
    }
    ranged = search(db, "a cat", "-k", "50", "--where", "page=..1", "--where", "path~report", "--group", "none")
    assert {(hit["kind"], hit["page"]) for hit in ranged} == {("image", 1), ("text", 1)}
    photos = search(db, "a cat", "-k", "50", "--where", "kind=image", "--where", "path!=" + str(corpus / "horse.png"))
    assert len(photos) == 5 + 4 - 1 and all(hit["kinds"].keys() == {"image"} for hit in photos)
    words = search(db, "a cat", "-k", "50", "--where", "text~espresso", "--group", "none")
    assert words and all("espresso" in hit["text"].lower() for hit in words)
    assert search(db, "a cat", "--where", "path~no-such-folder") == []


def test_a_bad_filter_gets_one_line(db: Path) -> None:
    assert "--where 'cat' is not a filter: write KEY=VALUE" in refused(db, "--where", "cat")
    assert "page is a whole number" in refused(db, "--where", "page=two")
    assert "the range runs from 5 down to 2" in refused(db, "--where", "page=5..2")
    assert "'stamp' is the index's own field" in refused(db, "--where", "stamp=1")
    assert "works on path (and ~ on text) only" in refused(db, "--where", "kind~ima")
    assert "--with-content goes with --json" in refused(db, "--with-content")


# -- pictures for RAG ----------------------------------------------------------------------


def test_with_content_gives_each_page_and_photo_its_picture(db: Path) -> None:
    hits = search(db, "a cat", "-k", "50", "--with-content", "--content-size", "256")
    for hit in hits:
        content = hit["content"]
        if hit["path"].endswith((".txt", ".md")):
            assert content is None
            continue
        with Image.open(io.BytesIO(base64.b64decode(content["data"]))) as picture:
            assert picture.format == ("PNG" if hit["path"].endswith(".pdf") else "JPEG")
            assert max(picture.size) <= 256 and picture.size == (content["width"], content["height"])
        assert content["media_type"] == ("image/png" if hit["path"].endswith(".pdf") else "image/jpeg")


# -- the server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(db: Path, tiny_path: Path) -> Iterator[str]:
    process, url = start_server(tiny_path, "--db", str(db))
    yield url
    stop(process)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/search", json=body, headers=AUTH, timeout=60)


def test_the_api_filters_and_groups_as_the_cli_does(server: str, db: Path) -> None:
    answer = post(server, {"text": "a galaxy far away", "k": 50})
    assert answer.status_code == 200, answer.text
    assert answer.json()["group"] == "page"
    cli = search(db, "a galaxy far away", "-k", "50")
    hits = answer.json()["hits"]
    assert [hit["id"] for hit in hits] == [hit["id"] for hit in cli]
    assert [hit["kinds"] for hit in hits] == [hit["kinds"] for hit in cli]
    page = next(hit for hit in hits if hit["path"].endswith(".pdf"))
    assert page["pages"] == 2 and page["thumbnail"] and page["file"] == f"/v1/records/{page['id']}/file"
    listed = post(server, {"text": "a cat", "k": 50, "where": ["path~notes"], "group": "none"}).json()
    mapped = post(server, {"text": "a cat", "k": 50, "where": {"kind": "text"}, "group": "none"}).json()
    assert listed["group"] == "none" and {Path(hit["path"]).parent.name for hit in listed["hits"]} == {"notes"}
    assert {hit["kind"] for hit in mapped["hits"]} == {"text"} and len(mapped["hits"]) > len(listed["hits"])
    for body, expected in (
        ({"where": ["page=two"]}, "page is a whole number"),
        ({"where": {"page": "2"}}, "'page' must be a whole number"),
        ({"where": ["marker=true"]}, "index's own field"),
        ({"group": "chapter"}, "group must be 'page', 'file' or 'none', got 'chapter'"),
        ({"content_size": 10_000}, "content_size: Input should be less than or equal to 2048"),
    ):
        refusal = post(server, {"text": "a cat", **body})
        assert refusal.status_code == 400, refusal.text
        error = refusal.json()["error"]
        assert expected in error["message"] and error["param"] == next(iter(body)), error


def test_content_true_returns_pictures_beside_the_text(server: str) -> None:
    hits = post(server, {"text": "a cat", "k": 20, "content": True, "content_size": 300}).json()["hits"]
    pages = [hit for hit in hits if hit["path"].endswith(".pdf")]
    assert pages and all(hit["content"]["media_type"] == "image/png" and hit["text"] for hit in pages)
    for hit in hits:
        if hit["content"] is not None:
            with Image.open(io.BytesIO(base64.b64decode(hit["content"]["data"]))) as picture:
                assert max(picture.size) <= 300
    assert all(hit["content"] is None for hit in post(server, {"text": "a cat"}).json()["hits"])


def test_a_hit_leads_to_its_file_by_record_id_only(server: str, corpus: Path, photos) -> None:
    hits = post(server, {"text": "a cat", "k": 50}).json()["hits"]
    page = next(hit for hit in hits if hit["path"].endswith("report.pdf"))
    got = httpx.get(server + page["file"], headers=AUTH)
    assert got.status_code == 200 and got.headers["content-type"] == "application/pdf"
    assert got.content == (corpus / "report.pdf").read_bytes()
    assert "report.pdf" in got.headers["content-disposition"] and got.headers["x-content-type-options"] == "nosniff"
    note = next(hit for hit in hits if hit["path"].endswith("espresso.txt"))
    text = httpx.get(server + note["file"], headers=AUTH)
    assert text.headers["content-type"] == "text/plain; charset=utf-8" and "espresso" in text.text
    assert httpx.get(server + page["file"]).status_code == 401
    assert httpx.get(server + page["file"], headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{server}/v1/records/nope/file", headers=AUTH).status_code == 404
    assert httpx.get(f"{server}/v1/records/..%2F..%2Fetc%2Fpasswd/file", headers=AUTH).status_code == 404
    horse = next(hit for hit in hits if hit["path"].endswith("horse.png"))
    original = (corpus / "horse.png").read_bytes()
    try:
        photos["coffee"].save(corpus / "horse.png")
        changed = httpx.get(server + horse["file"], headers=AUTH)
        assert changed.status_code == 409 and "changed since it was indexed" in changed.json()["error"]["message"]
        (corpus / "horse.png").unlink()
        gone = httpx.get(server + horse["file"], headers=AUTH)
        assert gone.status_code == 404 and "is gone" in gone.json()["error"]["message"]
    finally:
        (corpus / "horse.png").write_bytes(original)
    assert httpx.get(server + horse["file"], headers=AUTH).content == original
