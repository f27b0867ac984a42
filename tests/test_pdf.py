"""PDFs read page by page (e5v.pdf) and indexed as pages on a tiny checkpoint.

The PDFs are built here: fpdf2 writes real ones (text layers, an embedded photo, an
encrypted one); a few are written by hand where a defect is the point (a page object
that is missing, a document without pages).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fpdf import FPDF
from PIL import Image

from e5v.cli import main
from e5v.collection.files import SkippedPath, sha256_bytes, stamp
from e5v.collection.records import PdfFile, Stored, Unchanged, load_file, record_kinds
from e5v.core.inputs import Interleaved
from e5v.errors import ConfigurationError, InvalidInputError
from e5v.pdf import E5V_GRID, fit_scale, open_pdf, read_pdf, render_page

INTRO = (
    "Espresso is brewed by forcing hot water through finely ground coffee at high pressure. "
    "A good shot takes about twenty-five seconds and ends with a golden crema. "
) * 8  # about 1,300 characters: two passages of at most 800
CAPTION = "Chelsea the cat looks straight at the camera."


def fpdf_pages(pages: list[tuple[str | None, Image.Image | None]], path: Path, *, password: str | None = None) -> Path:
    """A PDF of A4 pages, each with its text (a real text layer) and/or a photo."""
    pdf = FPDF(format="A4")
    for text, photo in pages:
        pdf.add_page()
        if photo is not None:
            pdf.image(photo, x=20, y=20, w=120)
            pdf.set_y(120)
        if text is not None:
            pdf.set_font("Helvetica", size=12)
            pdf.multi_cell(0, 6, text)
    if password is not None:
        pdf.set_encryption(owner_password="owner", user_password=password)
    pdf.output(str(path))
    return path


def hand_written_pdf(pages: list[str | None]) -> bytes:
    """A minimal PDF: each ``str`` a page with that line of text (Helvetica), each
    ``None`` a page whose object is missing (PDFium counts it, and cannot load it)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        if text is None:
            kids.append("999 0 R")
            continue
        stream = f"BT /F1 24 Tf 72 700 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>"
        )
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def words(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    """report.pdf: a text page (two passages), a photo with a caption, a photo without
    any text; scan.pdf: one page without a text layer; torn.pdf: page 2 of 3 missing;
    locked.pdf (encrypted), broken.pdf (truncated), pageless.pdf (no pages), empty.pdf (0 bytes)."""
    root = tmp_path_factory.mktemp("pdfs")
    report = fpdf_pages([(INTRO, None), (CAPTION, photos["cat"]), (None, photos["rocket"])], root / "report.pdf")
    fpdf_pages([(None, photos["astronaut"])], root / "scan.pdf")
    (root / "torn.pdf").write_bytes(hand_written_pdf(["First page", None, "Third page"]))
    fpdf_pages([("A secret.", None)], root / "locked.pdf", password="user")
    (root / "broken.pdf").write_bytes(report.read_bytes()[:600])
    (root / "pageless.pdf").write_bytes(hand_written_pdf([]))
    (root / "empty.pdf").write_bytes(b"")
    return root


# -- reading and rendering -------------------------------------------------------------


@pytest.mark.parametrize(
    ("points", "pixels"),
    [
        ((595.28, 841.89), (476, 672)),  # A4 portrait: the 672x672 cell
        ((960, 540), (672, 378)),  # a 16:9 slide
        ((900, 300), (1008, 336)),  # a strip three times as wide as high: 336x1008
        ((300, 900), (336, 1008)),
        ((100, 100), (672, 672)),  # small pages are drawn larger
    ],
)
def test_a_page_is_drawn_as_large_as_its_best_grid_cell(points: tuple[float, float], pixels: tuple[int, int]) -> None:
    from transformers.image_processing_utils import select_best_resolution

    scale = fit_scale(*points)
    drawn = tuple(int(np.ceil(side * scale)) for side in points)  # PDFium rounds up
    assert drawn == pixels
    # LLaVA-NeXT's processor picks a cell the drawing fills along one side: it is not resized up or down
    cell_height, cell_width = select_best_resolution((pixels[1], pixels[0]), [list(cell) for cell in E5V_GRID])
    assert min(cell_width / pixels[0], cell_height / pixels[1]) == pytest.approx(1.0, abs=1 / 300)


def test_a_page_without_area_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="nothing to draw"):
        fit_scale(0, 792)


def test_text_and_renderings(corpus: Path) -> None:
    with open_pdf(corpus / "report.pdf") as pdf:
        assert len(pdf) == 3
        assert words(pdf.text(1)) == words(INTRO) and "\r" not in pdf.text(1)
        assert words(pdf.text(2)) == CAPTION
        assert pdf.text(3) == ""  # no text layer
        page = pdf.render(2)
        with pytest.raises(InvalidInputError, match="page 4 does not exist: the PDF has pages 1 to 3"):
            pdf.render(4)
    assert page.mode == "RGB" and page.size == (476, 672)
    pixels = np.asarray(page)
    assert pixels[:20].min() == 255  # the white margin above the photo
    assert pixels[60:300, 60:300].std() > 20  # the photo: not a blank page

    thumbnail = render_page(corpus / "report.pdf", 2, max_side=200)
    assert thumbnail.size == (142, 200)
    np.testing.assert_array_equal(np.asarray(render_page(corpus / "report.pdf", 2)), pixels)  # deterministic
    with pytest.raises(ConfigurationError, match="max_side must be at least 1"):
        render_page(corpus / "report.pdf", 1, max_side=0)


def test_bad_pdfs_say_why(corpus: Path) -> None:
    reasons = {
        "locked.pdf": "an encrypted PDF that needs a password",
        "broken.pdf": "not a readable PDF (Failed to load document (PDFium: Data format error))",
        "pageless.pdf": "not a readable PDF (Failed to load document (PDFium: Data format error))",
    }
    for name, reason in reasons.items():
        with pytest.raises(InvalidInputError, match=re.escape(f"'{corpus / name}': {reason}")):
            render_page(corpus / name, 1)
        loaded = load_file(corpus / name)
        assert isinstance(loaded, SkippedPath) and loaded.reason.startswith(reason)
    assert load_file(corpus / "empty.pdf") == SkippedPath(
        str(corpus / "empty.pdf"), "an empty file (0 bytes), not a PDF"
    )
    with open_pdf(corpus / "torn.pdf") as pdf, pytest.raises(InvalidInputError, match="page 2 cannot be read"):
        pdf.text(2)


def test_read_pdf_leaves_out_an_unreadable_page(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    pages = list(read_pdf(corpus / "torn.pdf"))
    assert [(page.number, page.pages, page.text) for page in pages] == [(1, 3, "First page"), (3, 3, "Third page")]
    assert "torn.pdf: page 2 cannot be read" in caplog.text
    assert Image.open(io.BytesIO(pages[0].png())).tobytes() == pages[0].image.tobytes()  # lossless


def test_record_kinds() -> None:
    assert record_kinds("interleaved, image") == ("image", "interleaved")  # canonical order
    assert record_kinds(["text"]) == ("text",)
    with pytest.raises(ConfigurationError, match="unknown PDF record kind 'images': choose one or more of image"):
        record_kinds("images,text")
    with pytest.raises(ConfigurationError, match="no PDF record kind given"):
        record_kinds("")


def test_load_file_hashes_and_counts_pages(corpus: Path) -> None:
    path = corpus / "report.pdf"
    digest = sha256_bytes(path.read_bytes())
    assert load_file(path) == PdfFile(str(path), digest, stamp(path.stat()), 3)
    same = {str(path): Stored("id", digest, None, "image,text")}
    assert load_file(path, known=same) == Unchanged(str(path), stamp(path.stat()))
    assert isinstance(load_file(path, known=same, pdf_records=("image",)), PdfFile)  # stored as other kinds


def test_a_missing_renderer_names_the_extra(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pypdfium2", None)  # what `import pypdfium2` meets without the package
    loaded = load_file(corpus / "report.pdf")
    assert isinstance(loaded, SkippedPath)
    assert loaded.reason == (
        "reading PDFs (e5v index, e5v.pdf) needs the package 'pypdfium2', which is not installed: "
        'pip install "e5v[pdf]"'
    )


# -- indexing --------------------------------------------------------------------------


def stored(db: Path, collection: str = "e5v") -> dict:
    import chromadb

    got = chromadb.PersistentClient(path=str(db)).get_collection(collection)
    return got.get(include=["metadatas", "documents", "embeddings"])


@pytest.fixture(scope="module")
def indexed(corpus: Path, tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str, str]:
    """The corpus indexed by one ``e5v index`` run (a subprocess: this process reads the
    database only afterwards)."""
    folder = tmp_path_factory.mktemp("indexed") / "docs"
    shutil.copytree(corpus, folder)
    db = folder.parent / "db"
    command = [sys.executable, "-m", "e5v", "index", str(folder), "--db", str(db), "--model", str(tiny_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # some failed
    return folder, db, result.stdout, result.stderr


def test_each_page_becomes_its_records(indexed, embedder) -> None:
    folder, db, _, _ = indexed
    records = stored(db)
    by_path: dict[str, list[tuple[dict, str | None, np.ndarray]]] = {}
    for metadata, document, vector in zip(records["metadatas"], records["documents"], records["embeddings"]):
        by_path.setdefault(Path(metadata["path"]).name, []).append((metadata, document, np.asarray(vector)))
    assert sorted(by_path) == ["report.pdf", "scan.pdf", "torn.pdf"]

    report = folder / "report.pdf"
    rows = by_path["report.pdf"]
    images = sorted((m["page"], v) for m, _, v in rows if m["kind"] == "image")
    assert [page for page, _ in images] == [1, 2, 3]  # one rendering a page, a page without text too
    expected = embedder.embed_images([render_page(report, page) for page in (1, 2, 3)])
    np.testing.assert_allclose(np.stack([v for _, v in images]), expected, atol=1e-5)

    texts = sorted((m["passage"], m, d, v) for m, d, v in rows if m["kind"] == "text")
    assert [(number, m["page"]) for number, m, _, _ in texts] == [(0, 1), (1, 1), (2, 2)]  # counted through the PDF
    with open_pdf(report) as pdf:
        for _, metadata, document, _ in texts:
            assert document == pdf.text(metadata["page"])[metadata["start"] : metadata["end"]]
            assert len(document) <= 800
    np.testing.assert_allclose(
        np.stack([v for *_, v in texts]), embedder.embed_texts([d for _, _, d, _ in texts]), atol=1e-5
    )
    sha = sha256_bytes(report.read_bytes())
    assert {m["sha256"] for m, _, _ in rows} == {sha}
    (marker,) = [m for m, _, _ in rows if m["marker"]]  # one marker a PDF, with the file's stamp and the kinds
    assert marker["stamp"] == stamp(report.stat()) and marker["pdf_records"] == "image,text"
    assert all("stamp" not in m and "pdf_records" not in m for m, _, _ in rows if not m["marker"])

    assert [(m["kind"], m["page"]) for m, _, _ in by_path["scan.pdf"]] == [("image", 1)]  # no text layer
    torn = sorted((m["page"], m["kind"], d) for m, d, _ in by_path["torn.pdf"])
    assert torn == [(1, "image", None), (1, "text", "First page"), (3, "image", None), (3, "text", "Third page")]


def test_bad_pdfs_and_pages_are_reported(indexed) -> None:
    folder, _, out, err = indexed
    assert out.strip() == "indexed 3 files (11 records), skipped 0 unchanged, failed 4, pages left out 1, pruned 0"
    unreadable = "not a readable PDF (Failed to load document (PDFium: Data format error)); check that the file is a "
    unreadable += "complete, unencrypted PDF with at least one page"
    assert sorted(err.splitlines()) == [
        f"failed: {folder / 'broken.pdf'}: {unreadable}",
        f"failed: {folder / 'empty.pdf'}: an empty file (0 bytes), not a PDF",
        f"failed: {folder / 'locked.pdf'}: an encrypted PDF that needs a password; e5v cannot read it: "
        "save a copy without the password",
        f"failed: {folder / 'pageless.pdf'}: {unreadable}",
        f"failed: {folder / 'torn.pdf'}: page 2 cannot be read (Failed to load page.); the rest of the PDF is indexed",
    ]


def test_a_page_queried_by_its_own_rendering_ranks_first(indexed, tmp_path: Path, capsys) -> None:
    folder, db, _, _ = indexed
    render_page(folder / "report.pdf", 2).save(tmp_path / "page.png")  # PNG: the same pixels
    assert (
        main(["search", "--image", str(tmp_path / "page.png"), "--db", str(db), "--group", "none", "--json", "-k", "3"])
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == str(folder / "report.pdf") and hits[0]["page"] == 2 and hits[0]["kind"] == "image"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[1]["score"] < hits[0]["score"]

    assert (
        main(["search", "espresso crema", "--db", str(db), "--group", "none", "--kind", "text", "--json", "-k", "20"])
        == 0
    )
    texts = json.loads(capsys.readouterr().out)
    assert {(Path(hit["path"]).name, hit["page"]) for hit in texts} >= {("report.pdf", 1), ("report.pdf", 2)}
    assert set(texts[0]) == {"rank", "id", "score", "kind", "path", "page", "passage", "start", "end", "text"}

    assert main(["search", "--image", str(tmp_path / "page.png"), "--db", str(db), "--group", "none", "-k", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[2:] == ["image", f"{folder / 'report.pdf'}#page=2"]


def test_reindex_skips_unchanged_pdfs_and_follows_changes(corpus: Path, tiny_path: Path, tmp_path: Path, embedder):
    from e5v.collection.pipeline import index_files
    from e5v.collection.repository import Store

    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("report.pdf", "scan.pdf"):
        shutil.copy(corpus / name, folder / name)
    store = Store(tmp_path / "db", "pdfs", create=True)

    def connect():
        return store.connect(str(tiny_path), batch_size=4)

    def nothing_to_embed():
        raise AssertionError("the model was loaded for unchanged files")

    first = index_files(store, [folder], connect, batch_size=4, progress=False)
    assert (first.indexed, first.records, first.failed) == (2, 7, [])
    before = store.collection.get()["ids"]

    again = index_files(store, [folder], nothing_to_embed, progress=False)
    assert (again.indexed, again.unchanged) == (0, 2)
    os.utime(folder / "scan.pdf", ns=(1, 1))  # same bytes, new stamp: the sha256 decides, and the stamp is kept
    touched = index_files(store, [folder], nothing_to_embed, progress=False)
    assert (touched.indexed, touched.unchanged) == (0, 2)
    assert store.stored()[str(folder / "scan.pdf")].stamp == stamp((folder / "scan.pdf").stat())
    assert sorted(store.collection.get()["ids"]) == sorted(before)

    # other kinds of records: the PDFs are indexed again, and their text passages are gone
    swapped = index_files(store, [folder], connect, pdf_records="image,interleaved", progress=False)
    assert (swapped.indexed, swapped.records) == (2, 8)
    got = store.collection.get(where={"path": str(folder / "report.pdf")}, include=["metadatas", "documents"])
    assert sorted((m["kind"], m["page"]) for m in got["metadatas"]) == [
        ("image", 1), ("image", 2), ("image", 3), ("interleaved", 1), ("interleaved", 2), ("interleaved", 3)
    ]  # fmt: skip
    with open_pdf(folder / "report.pdf") as pdf:
        page = {m["page"]: (id_, d) for id_, m, d in zip(got["ids"], got["metadatas"], got["documents"])
                if m["kind"] == "interleaved"}  # fmt: skip
        assert page[2][1] == pdf.text(2) and page[3][1] is None  # the page's text, none without a text layer
        expected = embedder.embed([Interleaved([pdf.render(2), pdf.text(2)]), Interleaved([pdf.render(3)])])
    vectors = store.collection.get(ids=[page[2][0], page[3][0]], include=["embeddings"])["embeddings"]
    np.testing.assert_allclose(np.asarray(vectors), expected, atol=1e-5)

    # a changed PDF: its records are replaced, those of pages it no longer has deleted
    fpdf_pages([("Only one page now.", None)], folder / "report.pdf")
    changed = index_files(store, [folder], connect, pdf_records="image,interleaved", progress=False)
    assert (changed.indexed, changed.unchanged, changed.records) == (1, 1, 2)
    got = store.collection.get(where={"path": str(folder / "report.pdf")}, include=["metadatas"])
    assert sorted((m["kind"], m["page"]) for m in got["metadatas"]) == [("image", 1), ("interleaved", 1)]


def test_a_page_the_model_refuses_is_left_out(tmp_path: Path, tiny_path: Path) -> None:
    """A text layer holding e5v's reserved ``<image>`` placeholder fails when embedded:
    that page is reported, the rest of its PDF is stored."""
    from e5v.collection.pipeline import index_files
    from e5v.collection.repository import Store

    fpdf_pages([("A page about cats.", None), ("Uses the <image> placeholder.", None)], tmp_path / "odd.pdf")
    store = Store(tmp_path / "db", "pdfs", create=True)
    reported: list[SkippedPath] = []
    summary = index_files(
        store, [tmp_path / "odd.pdf"], lambda: store.connect(str(tiny_path)), progress=False, report=reported.append
    )
    assert (summary.indexed, summary.records, summary.failed) == (1, 2, [])
    (left_out,) = summary.pages_failed
    assert reported == [left_out]
    assert left_out.reason.startswith("page 2: text str 'Uses the <image> placeholder.' contains the reserved image")
    assert left_out.reason.endswith("; the rest of the PDF is indexed")
    pages = {m["page"] for m in store.collection.get(include=["metadatas"])["metadatas"]}
    assert pages == {1}


def test_pdf_records_option(tmp_path: Path, tiny_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["index", str(tmp_path), "--db", str(tmp_path / "db"), "--pdf-records", "pages"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        "e5v index: error: argument --pdf-records: unknown PDF record kind 'pages': choose one or more of image, "
        "text, interleaved, comma-separated (e.g. image,text) (see `e5v index --help`)\n"
    )
    assert not (tmp_path / "db").exists()


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set size from /proc")
def test_a_long_pdf_streams_page_by_page(tmp_path: Path, tiny_path: Path, photos: dict[str, Image.Image]) -> None:
    """Indexing 300 pages takes no more memory than 20: pages are rendered, embedded and
    written a chunk at a time, never held whole. Measured here (2 cores, tiny checkpoint,
    A4 pages of text and a photo, each rendered at 476x672, about 1 MB), the resident
    set's peak growth: 55-57 MB for 20 pages, then 46-47 MB for 300 (the first run pays
    for warming up); with all 300 pages in one chunk (``PDF_PAGES_PER_WRITE = 1000``),
    376 MB."""
    from e5v.collection.pipeline import index_files
    from e5v.collection.repository import Store

    store = Store(tmp_path / "db", "long", create=True)
    embedder = store.connect(str(tiny_path), batch_size=16)
    growth = {}
    for pages in (20, 300):
        path = tmp_path / f"long-{pages}.pdf"
        pdf = FPDF(format="A4")
        for number in range(1, pages + 1):
            pdf.add_page()
            pdf.set_font("Helvetica", size=11)
            pdf.multi_cell(0, 5, f"Page {number}. " + "Coffee and cats on a long afternoon. " * 20)
            pdf.image(photos["cat"], x=20, y=120, w=120)
        pdf.output(str(path))
        peak, done = [rss()], threading.Event()

        def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss())
                time.sleep(0.005)

        start = peak[0]
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            summary = index_files(store, [path], lambda: embedder, pdf_records="image", progress=False)
        finally:
            done.set()
            sampler.join()
        assert (summary.indexed, summary.records) == (1, pages)
        growth[pages] = peak[0] - start
    # 280 pages more may not cost a third of their renderings (280 x 0.96 MB)
    assert growth[300] - growth[20] < 90 * 2**20, {pages: f"{grown / 2**20:.0f} MB" for pages, grown in growth.items()}
