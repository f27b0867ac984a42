"""E5VPDFReader: PDF pages as LlamaIndex ImageDocuments, indexed with E5VEmbedding on a tiny checkpoint."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from pdfs import CAPTION, TEXT, write_report
from PIL import Image

from e5v import E5VEmbedder, Interleaved, InvalidInputError
from e5v.pdf import render_page
from llama_index.core import SimpleDirectoryReader
from llama_index.core.indices import MultiModalVectorStoreIndex
from llama_index.core.schema import ImageDocument, MetadataMode
from llama_index.embeddings.e5v import E5VEmbedding, E5VPDFReader


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, Image.Image]) -> Path:
    """Two pages: text only, then a photo with a caption."""
    return write_report(tmp_path_factory.mktemp("pdf") / "report.pdf", photos["cat"])


@pytest.fixture(scope="module")
def model(embedder: E5VEmbedder) -> E5VEmbedding:
    return E5VEmbedding(embedder=embedder)


def decoded(document: ImageDocument) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(document.image))))


def test_each_page_is_an_image_document(report: Path) -> None:
    pages = E5VPDFReader().load_data(report, extra_info={"source": "tests"})
    assert [type(page) for page in pages] == [ImageDocument, ImageDocument]
    assert [page.metadata for page in pages] == [
        {"source": "tests", "file_path": str(report), "file_name": "report.pdf", "page": number, "total_pages": 2}
        for number in (1, 2)
    ]
    assert [" ".join(page.text.split()) for page in pages] == [TEXT, CAPTION]
    assert [page.id_ for page in pages] == [f"{report}#page=1", f"{report}#page=2"]
    for number, page in enumerate(pages, 1):
        assert page.image_mimetype == "image/png" and page.image_path is None
        np.testing.assert_array_equal(decoded(page), np.asarray(render_page(report, number)))  # as e5v indexes it
        # the reader's metadata is not embedded; the caller's is
        assert page.get_content(metadata_mode=MetadataMode.EMBED) == f"source: tests\n\n{page.text}"


def test_embed_image_node_is_the_interleaved_page_vector(report: Path, model: E5VEmbedding, embedder) -> None:
    pages = E5VPDFReader().load_data(report)
    vectors = np.asarray(model.embed_image_nodes(pages))
    expected = embedder.embed([Interleaved([render_page(report, n), page.text]) for n, page in enumerate(pages, 1)])
    np.testing.assert_allclose(vectors, expected, atol=1e-5)  # what `e5v index --pdf-records interleaved` stores


def test_a_multimodal_index_finds_a_page_by_its_rendering_and_its_text(
    report: Path, model: E5VEmbedding, embedder, tmp_path: Path
) -> None:
    pages = E5VPDFReader().load_data(report)
    index = MultiModalVectorStoreIndex.from_documents(pages, embed_model=model, image_embed_model=model)
    retriever = index.as_retriever(similarity_top_k=2, image_similarity_top_k=2)
    render_page(report, 2).save(tmp_path / "page.png")
    found = retriever.image_to_image_retrieve(str(tmp_path / "page.png"))
    assert found[0].node.metadata["page"] == 2 and found[0].score == pytest.approx(1.0, abs=1e-5)
    assert found[1].node.metadata["page"] == 1

    query = embedder.embed_texts([CAPTION])[0]
    texts = retriever.text_retrieve(CAPTION)
    scores = {hit.node.metadata["page"]: hit.score for hit in texts}
    page_texts = embedder.embed_texts([page.text for page in pages])
    assert scores == pytest.approx({1: float(query @ page_texts[0]), 2: float(query @ page_texts[1])}, abs=1e-5)

    # the interleaved page vector, set before indexing, is what both stores keep
    for page in pages:
        page.embedding = model.embed_image_node(page)
    interleaved = MultiModalVectorStoreIndex.from_documents(pages, embed_model=model, image_embed_model=model)
    hits = interleaved.as_retriever(image_similarity_top_k=2).image_to_image_retrieve(str(tmp_path / "page.png"))
    query = embedder.embed_images([render_page(report, 2)])[0]
    expected = embedder.embed([Interleaved([render_page(report, n), page.text]) for n, page in enumerate(pages, 1)])
    scores = {hit.node.metadata["page"]: hit.score for hit in hits}
    assert scores == pytest.approx({1: float(query @ expected[0]), 2: float(query @ expected[1])}, abs=1e-5)


def test_simple_directory_reader_takes_it_for_pdfs(report: Path) -> None:
    pages = SimpleDirectoryReader(input_dir=str(report.parent), file_extractor={".pdf": E5VPDFReader()}).load_data()
    assert [(page.metadata["file_name"], page.metadata["page"]) for page in pages] == [
        ("report.pdf", 1),
        ("report.pdf", 2),
    ]
    assert all(isinstance(page, ImageDocument) and page.image for page in pages)


def test_a_bad_pdf_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "bad.pdf").write_bytes(b"not a pdf")
    with pytest.raises(InvalidInputError, match="^" + re.escape(f"'{tmp_path / 'bad.pdf'}': not a readable PDF")):
        E5VPDFReader().load_data(tmp_path / "bad.pdf")
    with pytest.raises(ValueError, match="reads local files only"):
        E5VPDFReader().load_data(tmp_path / "bad.pdf", fs=object())
