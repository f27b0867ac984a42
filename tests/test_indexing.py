"""Passage splitting, file walking, file loading and indexing into a real embedded Chroma."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e5v.collection.files import SkippedPath, sha256_bytes, stamp, walk
from e5v.collection.passages import split_passages
from e5v.collection.records import FileRecords, Stored, Unchanged, load_file, record_id

# -- split_passages -----------------------------------------------------------------------

PARAGRAPHS = [
    "The first paragraph is short.",
    "The second one has two sentences. Here is the second.",
    "A third paragraph, to close.",
]


def check_passages(text: str, max_chars: int) -> list:
    passages = split_passages(text, max_chars)
    previous_end = 0
    for number, passage in enumerate(passages):
        assert passage.number == number
        assert passage.text == text[passage.start : passage.end]
        assert 0 < len(passage.text) <= max_chars
        assert passage.text == passage.text.strip()
        assert passage.start >= previous_end
        assert text[previous_end : passage.start].strip() == ""  # only whitespace falls between passages
        previous_end = passage.end
    assert text[previous_end:].strip() == ""
    return passages


def test_short_text_is_one_passage() -> None:
    text = "\n\n".join(PARAGRAPHS) + "\n"
    (passage,) = check_passages(text, 800)
    assert passage.text == text.strip()
    assert (passage.start, passage.end) == (0, len(text) - 1)


def test_paragraphs_are_packed_and_cut_at_breaks() -> None:
    text = "\n\n".join(PARAGRAPHS)
    limit = len(PARAGRAPHS[0]) + 2 + len(PARAGRAPHS[1])
    passages = check_passages(text, limit)
    assert [p.text for p in passages] == [PARAGRAPHS[0] + "\n\n" + PARAGRAPHS[1], PARAGRAPHS[2]]


def test_long_paragraph_is_cut_at_sentence_ends() -> None:
    text = 'One sentence here. "A quoted one!" Then a question? And the last.'
    passages = check_passages(text, 36)
    assert [p.text for p in passages] == ['One sentence here. "A quoted one!"', "Then a question? And the last."]


def test_long_sentence_is_cut_at_spaces_then_inside_words() -> None:
    passages = check_passages("alpha beta gamma delta", 11)
    assert [p.text for p in passages] == ["alpha beta", "gamma delta"]
    passages = check_passages("x" * 25, 10)
    assert [p.text for p in passages] == ["x" * 10, "x" * 10, "x" * 5]


def test_blank_text_has_no_passages() -> None:
    assert split_passages("") == []
    assert split_passages(" \n\n\t \n") == []


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_chars"):
        split_passages("text", 0)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab .!?\n\t\"')é")), max_size=400),
    max_chars=st.integers(1, 60),
)
def test_passages_cover_the_text_in_order(text: str, max_chars: int) -> None:
    passages = check_passages(text, max_chars)
    assert "".join("".join(p.text.split()) for p in passages) == "".join(text.split())


# -- walk -------------------------------------------------------------------------------


def test_walk_finds_supported_files_recursively(tmp_path: Path) -> None:
    names = ["b.png", "a.md", "sub/c.JPG", "sub/deep/d.txt", "sub/e.docx", "sub/f.PDF", ".hidden.png", ".git/f.md"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files, skipped, ignored = walk([tmp_path, tmp_path / "a.md"])  # a.md named twice: listed once
    wanted = ["a.md", "b.png", "sub/c.JPG", "sub/deep/d.txt", "sub/f.PDF"]
    assert files == sorted(tmp_path.resolve() / name for name in wanted)
    assert skipped == []
    assert ignored == [tmp_path / "sub" / "e.docx"]  # hidden files are not even counted


def test_walk_reports_missing_and_unsupported_paths(tmp_path: Path) -> None:
    (tmp_path / "doc.docx").write_bytes(b"PK")
    files, skipped, ignored = walk([tmp_path / "doc.docx", tmp_path / "missing"])
    assert files == [] and ignored == []
    assert [s.path for s in skipped] == [str(tmp_path / "doc.docx"), str(tmp_path / "missing")]
    assert "unsupported file type" in skipped[0].reason
    assert "no such file or folder" in skipped[1].reason


# -- load_file --------------------------------------------------------------------------


def test_load_image_and_text(tmp_path: Path, photos) -> None:
    photos["cat"].save(tmp_path / "cat.png")
    image = load_file(tmp_path / "cat.png")
    assert isinstance(image, FileRecords)
    (record,) = image.records
    assert record.id == record_id(str(tmp_path / "cat.png"))
    assert record.metadata == {
        "path": str(tmp_path / "cat.png"),
        "kind": "image",
        "sha256": sha256_bytes((tmp_path / "cat.png").read_bytes()),
        "stamp": stamp((tmp_path / "cat.png").stat()),
    }
    assert record.document is None

    text = "Cats sleep a lot.\n\n" + "They groom themselves. " * 50
    (tmp_path / "note.md").write_text(text, encoding="utf-8")
    note = load_file(tmp_path / "note.md", max_chars=300)
    assert isinstance(note, FileRecords) and len(note.records) > 2
    for number, record in enumerate(note.records):
        assert record.metadata["passage"] == number
        assert ("stamp" in record.metadata) == (number == 0)  # the marker alone carries it
        assert record.document == text[record.metadata["start"] : record.metadata["end"]]
    assert len({record.id for record in note.records}) == len(note.records)


def test_unchanged_file_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "note.txt"
    path.write_text("hello", encoding="utf-8")
    assert load_file(path, known={str(path): Stored("id", sha256_bytes(b"hello"))}) == Unchanged(
        str(path), stamp(path.stat())
    )
    assert load_file(path, known={str(path): Stored("id", "older", stamp(path.stat()))}) == Unchanged(str(path))
    assert isinstance(load_file(path, known={str(path): Stored("id", sha256_bytes(b"older"))}), FileRecords)


def test_unreadable_files_are_reported(tmp_path: Path, photos) -> None:
    photos["cat"].save(tmp_path / "cat.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "cat.png").read_bytes()[:2000])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.md").write_text("  \n", encoding="utf-8")
    truncated = load_file(tmp_path / "truncated.png")
    assert isinstance(truncated, SkippedPath) and "not a readable image" in truncated.reason
    latin1 = load_file(tmp_path / "latin1.txt")
    assert isinstance(latin1, SkippedPath) and "not UTF-8" in latin1.reason
    empty = load_file(tmp_path / "empty.md")
    assert isinstance(empty, FileRecords) and empty.records == ()


# -- index_files and Store, on an embedded Chroma ----------------------------------------


@pytest.fixture
def store(tmp_path: Path):
    from e5v.collection.repository import Store

    return Store(tmp_path / "db", "test", create=True)


def test_a_file_the_model_refuses_is_isolated(tmp_path: Path, store, embedder, tiny_path: Path) -> None:
    """Images are checked while reading; a text with the reserved ``<image>`` placeholder
    fails only when embedded, in a group with other files: they are still indexed."""
    from e5v.collection.pipeline import index_files

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.md").write_text("A note about cats.", encoding="utf-8")
    (corpus / "b.md").write_text("Uses the <image> placeholder.", encoding="utf-8")
    (corpus / "c.txt").write_text("A note about coffee.\n\nAnd a second paragraph.", encoding="utf-8")
    reported: list[SkippedPath] = []
    summary = index_files(
        store,
        [corpus],
        lambda: store.connect(str(tiny_path), batch_size=4),
        batch_size=4,
        progress=False,
        report=reported.append,
    )
    assert [s.path for s in reported] == [str(corpus / "b.md")]
    assert "passage 0" in reported[0].reason and "<image>" in reported[0].reason
    assert (summary.indexed, summary.records, summary.unchanged, len(summary.failed)) == (2, 2, 0, 1)

    stored = store.collection.get(include=["metadatas", "documents", "embeddings"])
    assert sorted(m["path"] for m in stored["metadatas"]) == [str(corpus / "a.md"), str(corpus / "c.txt")]
    expected = embedder.embed_texts(stored["documents"])
    np.testing.assert_allclose(np.asarray(stored["embeddings"]), expected, atol=1e-5)

    hits = store.query(expected[0], k=5)
    assert hits[0].id == stored["ids"][0] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[1].score == pytest.approx(float(expected[0] @ expected[1]), abs=1e-5)
