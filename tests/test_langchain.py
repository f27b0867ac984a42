"""langchain-e5v end to end: the adapter against the core, Chroma, InMemoryVectorStore, LCEL, the example."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings
from langchain_chroma import Chroma
from langchain_core.documents import Document
from langchain_core.runnables import RunnableLambda
from langchain_core.vectorstores import InMemoryVectorStore
from pydantic import ValidationError

from e5v import E5VEmbedder, Interleaved, InvalidInputError
from langchain_e5v import E5VEmbeddings

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "A cat sleeps on a warm sofa.",
    "A red rocket stands on the launch pad.",
    "A cup of coffee on a wooden table.",
    "The astronaut floats above the earth.",
    "The quick brown fox jumps over the lazy dog.",
]
IMAGE_NAMES = ["cat", "astronaut", "coffee", "rocket", "camera", "text", "logo"]


@pytest.fixture(scope="module")
def embeddings(embedder: E5VEmbedder) -> E5VEmbeddings:
    return E5VEmbeddings(embedder=embedder)


@pytest.fixture(scope="module")
def image_paths(photo_dir: Path) -> list[str]:
    return [str(photo_dir / f"{name}.png") for name in IMAGE_NAMES]


def _is_float_rows(rows: object, n: int, dimension: int) -> bool:
    return (
        isinstance(rows, list)
        and len(rows) == n
        and all(isinstance(row, list) and len(row) == dimension for row in rows)
        and all(type(x) is float for row in rows for x in row)
    )


def _assert_ranked(results: list[Document], query: np.ndarray, vector_of: dict[str, np.ndarray]) -> None:
    """The results are the corpus items nearest ``query``, nearest first (by the core's vectors)."""
    sims = [float(vector_of[doc.metadata["name"]] @ query) for doc in results]
    assert np.all(np.diff(sims) <= 1e-5), sims
    best = max(float(vector @ query) for vector in vector_of.values())
    assert sims[0] == pytest.approx(best, abs=1e-5)


# -- construction ---------------------------------------------------------------------


def test_adapters_by_name_share_one_loaded_model(tiny_path: Path, embedder: E5VEmbedder) -> None:
    first = E5VEmbeddings(model_name=str(tiny_path), batch_size=2)
    second = E5VEmbeddings(model=str(tiny_path), device="cpu", dtype="float32")
    assert first.embedder is not second.embedder
    assert first.embedder._loaded is second.embedder._loaded is embedder._loaded
    assert first.embedder.batch_size == 2
    assert second.embedder.batch_size == 16


def test_wraps_an_existing_embedder(embedder: E5VEmbedder) -> None:
    adapter = E5VEmbeddings(embedder=embedder, batch_size=3)
    assert adapter.embedder is embedder
    assert (adapter.model_name, adapter.device, adapter.dtype) == (embedder.model_name, "cpu", "float32")
    assert adapter.dimension == embedder.dimension == 64
    assert adapter.batch_size == 3


def test_rejects_loading_options_with_an_embedder(embedder: E5VEmbedder) -> None:
    with pytest.raises(ValueError, match=r"embedder= and loading options \['device', 'model'\]"):
        E5VEmbeddings(embedder=embedder, model="royokong/e5-v", device="cuda")


def test_rejects_bad_options(tiny_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"embedder_kwargs must not hold \['batch_size'\]"):
        E5VEmbeddings(model_name=str(tiny_path), embedder_kwargs={"batch_size": 8})
    with pytest.raises(ValidationError, match="batch_size"):
        E5VEmbeddings(model_name=str(tiny_path), batch_size=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        E5VEmbeddings(model_name=str(tiny_path), normalize=True)


def test_embedder_kwargs_reach_the_embedder(tiny_path: Path) -> None:
    adapter = E5VEmbeddings(model_name=str(tiny_path), embedder_kwargs={"prompts": "e5v-sts", "max_text_tokens": 7})
    assert adapter.embedder.prompts.name == "e5v-sts"
    assert adapter.embedder.max_text_tokens == 7


# -- vectors equal the core's -----------------------------------------------------------


def test_vectors_equal_the_core(tiny_path: Path, embedder: E5VEmbedder, image_paths: list[str]) -> None:
    adapter = E5VEmbeddings(model_name=str(tiny_path), batch_size=4)
    d = embedder.dimension
    texts = adapter.embed_documents(TEXTS)
    assert _is_float_rows(texts, len(TEXTS), d)
    np.testing.assert_allclose(texts, embedder.embed_texts(TEXTS), atol=1e-6)
    query = adapter.embed_query(TEXTS[1])
    assert _is_float_rows([query], 1, d)
    np.testing.assert_allclose(query, embedder.embed_texts([TEXTS[1]])[0], atol=1e-6)

    images = adapter.embed_image(uris=image_paths)
    assert _is_float_rows(images, len(image_paths), d)
    np.testing.assert_allclose(images, embedder.embed_images(image_paths), atol=1e-6)

    items = [[image_paths[0], "a cat on a sofa"], Interleaved(["two photos", image_paths[1], image_paths[2]])]
    interleaved = adapter.embed_interleaved(items)
    assert _is_float_rows(interleaved, 2, d)
    np.testing.assert_allclose(interleaved, embedder.embed_interleaved(items), atol=1e-6)

    edits = ["make it red", "at night"]
    composed = adapter.embed_composed(image_paths[:2], edits)
    assert _is_float_rows(composed, 2, d)
    np.testing.assert_allclose(composed, embedder.embed_composed(image_paths[:2], edits), atol=1e-6)


def test_embed_image_takes_more_images_than_a_batch(
    tiny_path: Path, embedder: E5VEmbedder, image_paths: list[str], photos: dict
) -> None:
    adapter = E5VEmbeddings(model_name=str(tiny_path), batch_size=2)
    uris = [*image_paths, image_paths[0]]  # 8 images, 4 batches of 2
    vectors = adapter.embed_image(uris)
    np.testing.assert_allclose(vectors, embedder.embed_images(uris), atol=1e-6)
    np.testing.assert_allclose(vectors[0], vectors[-1], atol=1e-6)
    # PIL images are image-likes too, as in the core
    np.testing.assert_allclose(adapter.embed_image([photos["cat"]]), [vectors[0]], atol=1e-6)


def test_empty_lists_give_no_vectors(embeddings: E5VEmbeddings) -> None:
    assert embeddings.embed_documents([]) == []
    assert embeddings.embed_image([]) == []


def test_core_errors_name_the_bad_item(embeddings: E5VEmbeddings, image_paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"^item 1:"):
        embeddings.embed_image([image_paths[0], str(tmp_path / "missing.png")])
    with pytest.raises(InvalidInputError, match="list of items"):
        embeddings.embed_image(image_paths[0])  # type: ignore[arg-type]


# -- async ----------------------------------------------------------------------------


async def _ticks_while(job: asyncio.Future) -> list[float]:
    ticks = []
    while not job.done():
        ticks.append(time.monotonic())
        await asyncio.sleep(0.001)
    return ticks


@pytest.mark.asyncio
async def test_async_methods_keep_the_event_loop_running(
    embeddings: E5VEmbeddings, embedder: E5VEmbedder, image_paths: list[str]
) -> None:
    started = time.monotonic()
    job = asyncio.ensure_future(embeddings.aembed_image(image_paths))
    ticks = await _ticks_while(job)
    finished = time.monotonic()
    vectors = job.result()
    # A coroutine that blocked the loop would let no tick run until it finished.
    assert sum(started < t < finished for t in ticks) >= 3
    np.testing.assert_allclose(vectors, embedder.embed_images(image_paths), atol=1e-6)

    job = asyncio.ensure_future(embeddings.aembed_documents(TEXTS))
    assert len(await _ticks_while(job)) >= 1
    np.testing.assert_allclose(job.result(), embedder.embed_texts(TEXTS), atol=1e-6)


@pytest.mark.asyncio
async def test_async_methods_equal_sync(embeddings: E5VEmbeddings, image_paths: list[str]) -> None:
    query, interleaved, composed = await asyncio.gather(
        embeddings.aembed_query(TEXTS[0]),
        embeddings.aembed_interleaved([[image_paths[3], "a launch"]]),
        embeddings.aembed_composed([image_paths[0]], ["as a drawing"]),
    )
    assert query == embeddings.embed_query(TEXTS[0])
    assert interleaved == embeddings.embed_interleaved([[image_paths[3], "a launch"]])
    assert composed == embeddings.embed_composed([image_paths[0]], ["as a drawing"])


# -- vector stores ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chroma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chroma")


def _persistent_chroma(path: Path, embeddings: E5VEmbeddings) -> Chroma:
    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    return Chroma(collection_name="media", embedding_function=embeddings, client=client)


@pytest.fixture(scope="module")
def chroma(embeddings: E5VEmbeddings, image_paths: list[str], chroma_dir: Path) -> Chroma:
    store = _persistent_chroma(chroma_dir, embeddings)
    store.add_texts(TEXTS, metadatas=[{"name": f"text{i}", "kind": "text"} for i in range(len(TEXTS))])
    store.add_images(image_paths, metadatas=[{"name": name, "kind": "image"} for name in IMAGE_NAMES])
    return store


@pytest.fixture(scope="module")
def vector_of(embedder: E5VEmbedder, image_paths: list[str]) -> dict[str, np.ndarray]:
    """The core's vector of every stored item, by name."""
    texts = dict(zip((f"text{i}" for i in range(len(TEXTS))), embedder.embed_texts(TEXTS)))
    return {**texts, **dict(zip(IMAGE_NAMES, embedder.embed_images(image_paths)))}


def test_chroma_text_search(chroma: Chroma, embedder: E5VEmbedder, vector_of: dict[str, np.ndarray]) -> None:
    results = chroma.similarity_search("a rocket launch", k=5)
    assert len(results) == 5
    _assert_ranked(results, embedder.embed_texts(["a rocket launch"])[0], vector_of)
    texts = chroma.similarity_search("a rocket launch", k=3, filter={"kind": "text"})
    assert {doc.metadata["kind"] for doc in texts} == {"text"}
    assert all(doc.page_content in TEXTS for doc in texts)


@pytest.mark.parametrize("name", IMAGE_NAMES)
def test_chroma_image_queried_by_itself_comes_first(
    chroma: Chroma, photo_dir: Path, embedder: E5VEmbedder, vector_of: dict[str, np.ndarray], name: str
) -> None:
    results = chroma.similarity_search_by_image(str(photo_dir / f"{name}.png"), k=4)
    assert results[0].metadata == {"name": name, "kind": "image"}
    _assert_ranked(results, vector_of[name], vector_of)


def test_chroma_interleaved_query(
    chroma: Chroma, embeddings: E5VEmbeddings, embedder: E5VEmbedder, image_paths: list[str], vector_of: dict
) -> None:
    query = [image_paths[3], "the same rocket, at night"]
    vector = embeddings.embed_interleaved([query])[0]
    results = chroma.similarity_search_by_vector(vector, k=6)
    assert len(results) == 6
    _assert_ranked(results, embedder.embed_interleaved([query])[0], vector_of)


def test_chroma_persists(
    chroma: Chroma, chroma_dir: Path, tiny_path: Path, photo_dir: Path, vector_of: dict[str, np.ndarray]
) -> None:
    reopened = _persistent_chroma(chroma_dir, E5VEmbeddings(model_name=str(tiny_path)))
    assert len(reopened.get()["ids"]) == len(TEXTS) + len(IMAGE_NAMES)
    results = reopened.similarity_search_by_image(str(photo_dir / "coffee.png"), k=2)
    assert results[0].metadata["name"] == "coffee"
    _assert_ranked(results, vector_of["coffee"], vector_of)


def test_in_memory_store_and_retriever_chain(
    embeddings: E5VEmbeddings, embedder: E5VEmbedder, image_paths: list[str]
) -> None:
    store = InMemoryVectorStore(embedding=embeddings)
    docs = [Document(page_content=text, metadata={"name": f"text{i}"}) for i, text in enumerate(TEXTS)]
    store.add_documents(docs)
    vector_of = dict(zip((f"text{i}" for i in range(len(TEXTS))), embedder.embed_texts(TEXTS)))

    results = store.similarity_search("coffee on a table", k=3)
    _assert_ranked(results, embedder.embed_texts(["coffee on a table"])[0], vector_of)

    query = Interleaved([image_paths[2], "what is in this cup?"])
    by_vector = store.similarity_search_by_vector(embeddings.embed_interleaved([query])[0], k=2)
    _assert_ranked(by_vector, embedder.embed_interleaved([query])[0], vector_of)

    retriever = store.as_retriever(search_kwargs={"k": 2})
    chain = (
        retriever
        | RunnableLambda(lambda found: "\n".join(f"- {doc.page_content}" for doc in found))
        | RunnableLambda(lambda context: f"Context:\n{context}")
    )
    answer = chain.invoke("coffee on a table")
    expected = "\n".join(f"- {doc.page_content}" for doc in results[:2])
    assert answer == f"Context:\n{expected}"
    assert asyncio.run(chain.ainvoke("coffee on a table")) == answer


# -- the example ------------------------------------------------------------------------


def test_example_runs_on_a_tiny_checkpoint(tiny_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "langchain_rag.py"), "--model", str(tiny_path), "-k", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    # One block per query: a header, then k lines "rank. kind source".
    headers = [i for i, line in enumerate(lines) if line.startswith("query ")]
    assert [lines[i].split(":")[0] for i in headers] == ["query text"] * 3 + ["query image", "query interleaved"]
    for i in headers:
        block = lines[i + 1 : i + 4]
        assert [line.split(".")[0] for line in block] == ["1", "2", "3"]
        assert all(line.split()[1] in {"text", "image"} for line in block)
    assert {line.split()[1] for line in lines if line[:1].isdigit()} == {"text", "image"}
    assert lines[headers[3]] == "query image: chelsea.png"
    assert lines[headers[3] + 1] == "1. image chelsea.png"
    assert len(lines) == 5 * 4
