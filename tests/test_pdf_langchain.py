"""E5VPDFLoader: PDF pages as LangChain Documents, embedded with E5VEmbeddings and stored in a real Chroma."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from langchain_chroma import Chroma
from langchain_core.documents import Document
from pdfs import CAPTION, TEXT, write_report
from PIL import Image

from e5v import E5VEmbedder
from e5v.pdf import render_page
from langchain_e5v import E5VEmbeddings, E5VPDFLoader


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    """Two pages: text only, then a photo with a caption."""
    return write_report(tmp_path_factory.mktemp("pdf") / "report.pdf", photos["cat"])


@pytest.fixture(scope="module")
def embeddings(embedder: E5VEmbedder) -> E5VEmbeddings:
    return E5VEmbeddings(embedder=embedder)


def test_each_page_is_a_document_with_its_rendering(report: Path, embeddings: E5VEmbeddings, embedder) -> None:
    pages = E5VPDFLoader(report).load()
    assert [type(page) for page in pages] == [Document, Document]
    assert [" ".join(page.page_content.split()) for page in pages] == [TEXT, CAPTION]
    assert [{key: page.metadata[key] for key in ("source", "page", "total_pages")} for page in pages] == [
        {"source": str(report), "page": number, "total_pages": 2} for number in (1, 2)
    ]
    uris = [page.metadata["image"] for page in pages]
    assert all(uri.startswith("data:image/png;base64,") for uri in uris)
    for number, uri in enumerate(uris, 1):
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
        np.testing.assert_array_equal(pixels, np.asarray(render_page(report, number)))
    expected = embedder.embed_images([render_page(report, number) for number in (1, 2)])
    np.testing.assert_allclose(np.asarray(embeddings.embed_image(uris)), expected, atol=1e-5)


def test_pages_in_a_chroma_store_by_image_and_by_text(report: Path, embeddings: E5VEmbeddings, tmp_path: Path) -> None:
    pages = list(E5VPDFLoader(report, image_dir=tmp_path / "pages").lazy_load())
    paths = [page.metadata["image_path"] for page in pages]
    assert [Path(path).parent for path in paths] == [tmp_path / "pages"] * 2 and "image" not in pages[0].metadata
    assert all(
        Path(path).name.startswith("report-") and path.endswith(f"-page{n}.png") for n, path in enumerate(paths, 1)
    )
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == sorted(Path(path).name for path in paths)

    store = Chroma(collection_name="pages", embedding_function=embeddings, persist_directory=str(tmp_path / "db"))
    store.add_images(paths, metadatas=[{"source": p.metadata["source"], "page": p.metadata["page"]} for p in pages])
    store.add_documents(pages)
    (found,) = store.similarity_search_by_image(paths[1], k=1)
    assert found.metadata["page"] == 2 and found.metadata["source"] == str(report)
    texts = store.similarity_search(CAPTION, k=4, filter={"image_path": {"$in": paths}})
    assert {(doc.metadata["page"], " ".join(doc.page_content.split())) for doc in texts} == {(1, TEXT), (2, CAPTION)}
