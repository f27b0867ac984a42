"""The ``e5v`` command line on a tiny checkpoint: the runs that create, reopen and
update a collection are subprocesses (``python -m e5v``); as each pays seconds of
imports, the other runs go through ``e5v.cli.main`` in-process. (An in-process Chroma
client keeps its vector index in memory: it must not query a database that a
subprocess writes to afterwards.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from e5v.cli import main
from e5v.pdf import open_pdf

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
EXAMPLE_FILES = [
    "astronaut.jpg",
    "chelsea.png",
    "coffee.jpg",
    "horse.png",
    "hubble-deep-field.pdf",
    "notes/cats.md",
    "notes/espresso.txt",
    "notes/horses.txt",
    "notes/space-flight.md",
    "rocket.jpg",
]


def e5v(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "e5v", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def stored(db: Path, collection: str = "e5v") -> dict:
    """Everything in a collection, read with a fresh client (metadata reads are not cached)."""
    import chromadb

    got = chromadb.PersistentClient(path=str(db)).get_collection(collection)
    return got.get(include=["metadatas", "documents", "embeddings"])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, tiny_path: Path):
    """The example corpus plus a truncated PNG, indexed by one ``e5v index`` run."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    shutil.copytree(EXAMPLES, corpus)
    (corpus / "broken.png").write_bytes((EXAMPLES / "chelsea.png").read_bytes()[:3000])
    result = e5v("index", corpus, "--db", root / "db", "--model", tiny_path, "--batch-size", "4")
    return corpus, root / "db", result


def test_index_reports_the_corrupt_file_and_indexes_the_rest(indexed, tiny_path: Path) -> None:
    corpus, db, result = indexed
    assert result.returncode == 1, result.stderr
    assert f"failed: {corpus / 'broken.png'}: " in result.stderr
    assert "not a readable image" in result.stderr
    assert "item/s" not in result.stderr  # no progress bars in a pipe (tests/test_first_hour.py: on a terminal)
    records = stored(db)
    passages = sum(1 for m in records["metadatas"] if m["kind"] == "text")
    assert result.stdout.strip() == (
        f"indexed 10 files ({len(records['ids'])} records), skipped 0 unchanged, failed 1, pruned 0"
    )
    assert sorted({m["path"] for m in records["metadatas"]}) == [str(corpus / name) for name in EXAMPLE_FILES]
    assert passages == len(records["ids"]) - 7 > 4  # 5 photos and 2 PDF pages; space-flight.md is split
    for metadata, document in zip(records["metadatas"], records["documents"]):
        content = Path(metadata["path"]).read_bytes()
        assert metadata["sha256"] == hashlib.sha256(content).hexdigest()
        if "page" in metadata:  # hubble-deep-field.pdf: a text page, then a photo with a caption
            assert (metadata["kind"], metadata["page"]) in {("image", 1), ("image", 2), ("text", 1), ("text", 2)}
            if metadata["kind"] == "text":
                with open_pdf(metadata["path"]) as pdf:
                    assert document == pdf.text(metadata["page"])[metadata["start"] : metadata["end"]]
        elif metadata["kind"] == "text":
            assert document == content.decode()[metadata["start"] : metadata["end"]]
            assert len(document) <= 800
        else:
            assert document is None and "passage" not in metadata


def test_search_by_image_finds_that_image_first(indexed, embedder, capsys) -> None:
    corpus, db, _ = indexed
    assert (
        main(
            ["search", "--image", str(corpus / "chelsea.png"), "--db", str(db), "--group", "none", "--json", "-k", "4"]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert [hit["rank"] for hit in hits] == [1, 2, 3, 4]
    assert hits[0]["path"] == str(corpus / "chelsea.png") and hits[0]["kind"] == "image"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    records = stored(db)
    vectors = dict(zip(records["ids"], np.asarray(records["embeddings"])))
    query = embedder.embed_images([corpus / "chelsea.png"])[0]
    for hit in hits:
        assert hit["score"] == pytest.approx(float(query @ vectors[hit["id"]]), abs=1e-4)
    assert [hit["score"] for hit in hits] == sorted((hit["score"] for hit in hits), reverse=True)


def test_another_model_is_refused(indexed, checkpoints) -> None:
    corpus, db, _ = indexed
    other = checkpoints["tiny-left"]
    result = e5v("search", "a cat", "--db", db, "--model", other)
    assert result.returncode == 2
    assert f"holds vectors of '{checkpoints['tiny'].resolve()}', not '{other}'" in result.stderr
    assert main(["index", str(corpus), "--db", str(db), "--model", str(other), "-q"]) == 2


def test_search_by_text_and_composed(indexed, embedder, capsys) -> None:
    corpus, db, _ = indexed
    records = stored(db)
    vectors = dict(zip(records["ids"], np.asarray(records["embeddings"])))

    assert (
        main(
            [
                "search",
                "how to make espresso",
                "--db",
                str(db),
                "--group",
                "none",
                "--kind",
                "text",
                "--json",
                "-k",
                "3",
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and {hit["kind"] for hit in hits} == {"text"}
    assert set(hits[0]) >= {"path", "kind", "score", "id", "passage", "start", "end", "text"}
    query = embedder.embed_texts(["how to make espresso"])[0]
    assert hits[0]["score"] == pytest.approx(float(query @ vectors[hits[0]["id"]]), abs=1e-4)

    cat = str(corpus / "chelsea.png")
    assert (
        main(["search", "make it a dog", "--image", cat, "--db", str(db), "--group", "none", "--json", "-k", "1"]) == 0
    )
    (hit,) = json.loads(capsys.readouterr().out)
    query = embedder.embed_composed([cat], ["make it a dog"])[0]
    assert hit["score"] == pytest.approx(float(query @ vectors[hit["id"]]), abs=1e-4)
    assert hit["score"] == pytest.approx(max(float(query @ v) for v in vectors.values()), abs=1e-4)

    assert main(["search", "a cat", "--db", str(db), "--group", "none", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "kind", "path", "passage"]
    assert len(table) == 3 and table[1].startswith("1 ") and table[2].startswith("2 ")


def test_search_errors(indexed, tmp_path: Path, capsys) -> None:
    _, db, _ = indexed
    assert main(["search", "a cat", "--db", str(tmp_path / "nothing")]) == 2
    assert "no database at" in capsys.readouterr().err
    assert main(["search", "a cat", "--db", str(db), "--collection", "other"]) == 2
    assert "no collection 'other'" in capsys.readouterr().err
    assert main(["search", "--db", str(db)]) == 2
    assert "give a query TEXT, an --image, or both" in capsys.readouterr().err
    assert main(["search", "--image", str(tmp_path / "missing.png"), "--db", str(db)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reindex_skips_unchanged_replaces_changed_and_prunes(tmp_path: Path, photo_dir: Path, tiny_path: Path) -> None:
    corpus, db = tmp_path / "corpus", tmp_path / "db"
    corpus.mkdir()
    for name in ("cat.png", "rocket.png"):
        shutil.copy(photo_dir / name, corpus / name)
    note = corpus / "note.md"
    note.write_text("\n\n".join(f"Paragraph {i} about cats, long enough to stand alone." * 3 for i in range(4)))
    first = ["index", str(corpus), "--db", str(db), "--model", str(tiny_path), "--max-chars", "200", "-q"]
    assert main(first) == 0  # in-process: this process does not query this database later
    before = stored(db)
    assert sum(m["path"] == str(note) for m in before["metadatas"]) == 4

    again = e5v("index", corpus, "--db", db, "--max-chars", "200")  # unchanged: the model is not even loaded
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "indexed 0 files (0 records), skipped 3 unchanged, failed 0, pruned 0"
    assert stored(db)["ids"] == before["ids"]

    note.write_text("Now a single short paragraph about dogs.")
    (corpus / "rocket.png").unlink()
    changed = e5v("index", corpus, "--db", db, "--max-chars", "200", "--prune", "--quiet")
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.strip() == "indexed 1 file (1 record), skipped 1 unchanged, failed 0, pruned 1"
    assert "item/s" not in changed.stderr
    after = stored(db)
    assert sorted(m["path"] for m in after["metadatas"]) == [str(corpus / "cat.png"), str(note)]
    (text,) = [doc for doc, m in zip(after["documents"], after["metadatas"]) if m["path"] == str(note)]
    assert text == "Now a single short paragraph about dogs."


def test_embed_npy_and_jsonl(photo_dir: Path, tiny_path: Path, tmp_path: Path, embedder, capsys) -> None:
    cat = str(photo_dir / "cat.png")
    inputs = ["a photo of a cat", cat, str(tmp_path / "missing.png")]  # a missing file is text
    expected = embedder.embed(["a photo of a cat", Path(cat), str(tmp_path / "missing.png")])
    model = ["--model", str(tiny_path)]

    assert main(["embed", *inputs, "--output", str(tmp_path / "v.npy"), *model]) == 0
    matrix = np.load(tmp_path / "v.npy")
    assert matrix.dtype == np.float32 and matrix.shape == expected.shape
    np.testing.assert_allclose(matrix, expected, atol=1e-5)

    assert main(["embed", *inputs, *model]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["input"], line["kind"]) for line in lines] == list(zip(inputs, ["text", "image", "text"]))
    np.testing.assert_allclose(np.array([line["embedding"] for line in lines]), expected, atol=1e-5)

    assert main(["embed", cat, "--kind", "text", "--output", str(tmp_path / "t.jsonl"), *model]) == 0
    (line,) = (json.loads(text) for text in (tmp_path / "t.jsonl").read_text().splitlines())
    np.testing.assert_allclose(line["embedding"], embedder.embed_texts([cat])[0], atol=1e-5)

    assert main(["embed", inputs[2], "--kind", "image", *model]) == 2
    assert f"INPUT 1 ('{inputs[2]}')" in capsys.readouterr().err
    assert main(["embed", "x", "--output", str(tmp_path / "v.csv"), *model]) == 2


@pytest.mark.parametrize("command", ["index", "search", "embed"])
def test_help_has_examples(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"e5v {command} " in text.split("examples:")[1]


def test_version(capsys) -> None:
    from e5v import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.fullmatch(rf"e5v {re.escape(__version__)}\n", capsys.readouterr().out)
