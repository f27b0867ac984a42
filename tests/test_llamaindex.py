"""The LlamaIndex adapter: batching, async, interleaved nodes, and a real multimodal index on Chroma."""

from __future__ import annotations

import base64
import math
import os
import re
import subprocess
import sys
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import pytest

from e5v import E5VEmbedder, Interleaved, InvalidInputError
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.embeddings import MultiModalEmbedding
from llama_index.core.indices import MultiModalVectorStoreIndex
from llama_index.core.schema import ImageDocument, ImageNode, MetadataMode, TextNode
from llama_index.core.storage.kvstore import SimpleKVStore
from llama_index.embeddings.e5v import E5VEmbedding
from llama_index.vector_stores.chroma import ChromaVectorStore

REPO = Path(__file__).resolve().parents[1]
IMAGES = ("cat", "astronaut", "coffee", "rocket", "camera")
TEXTS = (
    "A tabby cat lies on a rug.",
    "An astronaut poses in an orange suit.",
    "A rocket stands on the launch pad.",
    "A cup of coffee on a saucer.",
)
CAPTION = "The scikit-image logo: a snake on a blue and yellow background."


class CountingEmbedder(E5VEmbedder):
    """The real embedder, recording each public call (method, items, thread) and each model batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int, str]] = []
        self.forward_sizes: list[int] = []

    def _record(self, method: str, items: Any) -> None:
        self.calls.append((method, len(items), threading.current_thread().name))

    def embed_texts(self, texts: Any, **options: Any) -> np.ndarray:
        self._record("texts", texts)
        return super().embed_texts(texts, **options)

    def embed_images(self, images: Any, **options: Any) -> np.ndarray:
        self._record("images", images)
        return super().embed_images(images, **options)

    def embed(self, items: Any, **options: Any) -> np.ndarray:
        self._record("mixed", items)
        return super().embed(items, **options)

    def _forward(self, batch: list[Any]) -> np.ndarray:
        self.forward_sizes.append(len(batch))
        return super()._forward(batch)


@pytest.fixture
def counting(tiny_path: Path) -> CountingEmbedder:
    return CountingEmbedder(tiny_path, batch_size=4)


@pytest.fixture(scope="module")
def model(tiny_path: Path) -> E5VEmbedding:
    return E5VEmbedding(tiny_path, embed_batch_size=2)


def paths(photo_dir: Path, names: tuple[str, ...] = IMAGES) -> list[str]:
    return [str(photo_dir / f"{name}.png") for name in names]


def assert_vectors(actual: Any, expected: np.ndarray) -> None:
    assert all(type(value) is float for row in actual for value in row)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=1e-6)


# -- construction -------------------------------------------------------------------------


def test_is_a_llamaindex_multimodal_embedding(model: E5VEmbedding, tiny_path: Path) -> None:
    assert isinstance(model, MultiModalEmbedding)
    assert E5VEmbedding.class_name() == "E5VEmbedding"
    assert model.model_name == str(tiny_path)
    assert model.embed_batch_size == 2
    assert model.to_dict()["class_name"] == "E5VEmbedding"


def test_adapters_by_name_share_one_loaded_model(tiny_path: Path, embedder: E5VEmbedder) -> None:
    first = E5VEmbedding(tiny_path)
    second = E5VEmbedding(str(tiny_path), embed_batch_size=3, device="cpu", dtype="float32")
    restored = E5VEmbedding.from_dict(second.to_dict())
    assert first.embedder is not second.embedder
    assert first.embedder._loaded is second.embedder._loaded is restored.embedder._loaded is embedder._loaded
    assert restored.embed_batch_size == 3


def test_wraps_an_existing_embedder(embedder: E5VEmbedder) -> None:
    wrapped = E5VEmbedding(embedder=embedder)
    assert wrapped.embedder is embedder
    assert (wrapped.model_name, wrapped.device, wrapped.dtype) == (embedder.model_name, "cpu", "float32")
    assert wrapped.embed_batch_size == embedder.batch_size
    assert E5VEmbedding(embedder=embedder, embed_batch_size=1).embed_batch_size == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [({"dtype": "float16"}, "cannot be combined with embedder="), ({"model_name": "other/model"}, "differs from")],
)
def test_embedder_and_load_options_conflict(embedder: E5VEmbedder, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        E5VEmbedding(embedder=embedder, **options)


# -- vectors and batching -------------------------------------------------------------------


def test_text_and_query_vectors_equal_the_core(model: E5VEmbedding, embedder: E5VEmbedder) -> None:
    expected = embedder.embed_texts(list(TEXTS))
    assert_vectors(model.get_text_embedding_batch(list(TEXTS)), expected)
    assert_vectors([model.get_text_embedding(TEXTS[1])], expected[1:2])
    assert_vectors([model.get_query_embedding(TEXTS[2])], expected[2:3])
    assert model.get_text_embedding_batch([]) == []


def test_image_vectors_equal_the_core_for_paths_and_streams(
    model: E5VEmbedding, embedder: E5VEmbedder, photo_dir: Path
) -> None:
    files = paths(photo_dir)
    expected = embedder.embed_images(files)
    assert_vectors(model.get_image_embedding_batch(files), expected)
    streams = [BytesIO(Path(file).read_bytes()) for file in files[:2]]
    assert_vectors(model.get_image_embedding_batch(streams), expected[:2])
    assert_vectors([model.get_image_embedding(files[3])], expected[3:4])


def test_bad_image_names_the_item(model: E5VEmbedding, photo_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"item 1: image file .*missing\.png' does not exist"):
        model.get_image_embedding_batch([str(photo_dir / "cat.png"), str(photo_dir / "missing.png")])


@pytest.mark.parametrize("kind", ["texts", "images"])
def test_lists_are_embedded_in_real_batches(counting: CountingEmbedder, photo_dir: Path, kind: str) -> None:
    adapter = E5VEmbedding(embedder=counting, embed_batch_size=2)
    if kind == "texts":
        vectors = adapter.get_text_embedding_batch([*TEXTS, "one more"])
    else:
        vectors = adapter.get_image_embedding_batch(paths(photo_dir))
    assert len(vectors) == 5
    assert [(method, size) for method, size, _ in counting.calls] == [(kind, 2), (kind, 2), (kind, 1)]  # ceil(5/2)
    assert counting.forward_sizes == [2, 2, 1]


@pytest.mark.asyncio
async def test_async_batches_run_off_the_event_loop(
    counting: CountingEmbedder, embedder: E5VEmbedder, photo_dir: Path
) -> None:
    adapter = E5VEmbedding(embedder=counting, embed_batch_size=2)
    files = paths(photo_dir)
    texts = [*TEXTS, "one more"]
    assert_vectors(await adapter.aget_text_embedding_batch(texts), embedder.embed_texts(texts))
    assert_vectors(await adapter.aget_image_embedding_batch(files), embedder.embed_images(files))
    assert sorted((method, size) for method, size, _ in counting.calls) == [
        ("images", 1),
        ("images", 2),
        ("images", 2),
        ("texts", 1),
        ("texts", 2),
        ("texts", 2),
    ]
    loop_thread = threading.current_thread().name
    assert all(thread != loop_thread for _, _, thread in counting.calls)


@pytest.mark.asyncio
async def test_async_single_items_equal_sync(model: E5VEmbedding, photo_dir: Path) -> None:
    image = paths(photo_dir)[0]
    assert await model.aget_query_embedding(TEXTS[0]) == model.get_query_embedding(TEXTS[0])
    assert await model.aget_text_embedding(TEXTS[1]) == model.get_text_embedding(TEXTS[1])
    assert await model.aget_image_embedding(image) == model.get_image_embedding(image)


# -- errors name the item's index in the caller's list, not in LlamaIndex's batch ------------------

BAD_TEXT = "A cat <image> on a rug."  # e5v rejects a text holding its image placeholder
TEXT_ERROR = r"text .* contains the reserved image placeholder"
IMAGE_ERROR = r"image file .*missing\.png' does not exist"


@pytest.fixture(scope="module")
def batched(embedder: E5VEmbedder) -> E5VEmbedding:
    """LlamaIndex cuts 21 items into batches of 16 and 5."""
    return E5VEmbedding(embedder=embedder, embed_batch_size=16)


def with_bad_item(kind: str, photo_dir: Path, position: int) -> list[str]:
    """21 valid texts or image paths (repeating), with an invalid one at ``position``."""
    items = list(TEXTS) * 6 if kind == "texts" else paths(photo_dir) * 5
    items = items[:21]
    items[position] = BAD_TEXT if kind == "texts" else str(photo_dir / "missing.png")
    return items


async def embed_batch(model: E5VEmbedding, kind: str, items: list[str], asynchronous: bool) -> list[list[float]]:
    if kind == "texts":
        return await model.aget_text_embedding_batch(items) if asynchronous else model.get_text_embedding_batch(items)
    return await model.aget_image_embedding_batch(items) if asynchronous else model.get_image_embedding_batch(items)


@pytest.mark.asyncio
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("position", [20, 3])
@pytest.mark.parametrize("kind", ["texts", "images"])
async def test_batch_error_names_the_index_in_the_callers_list(
    batched: E5VEmbedding, photo_dir: Path, kind: str, position: int, asynchronous: bool
) -> None:
    items = with_bad_item(kind, photo_dir, position)
    error = TEXT_ERROR if kind == "texts" else IMAGE_ERROR
    with pytest.raises(InvalidInputError, match=rf"^item {position}: {error}") as caught:
        await embed_batch(batched, kind, items, asynchronous)
    assert type(caught.value) is InvalidInputError
    assert caught.value.index == position


@pytest.mark.asyncio
async def test_async_batch_error_with_concurrent_workers(embedder: E5VEmbedder) -> None:
    workers = E5VEmbedding(embedder=embedder, embed_batch_size=4, num_workers=3)
    texts = [*TEXTS * 4, BAD_TEXT, *TEXTS]  # batches at 0, 4, 8, 12, 16 (the bad text), 20
    with pytest.raises(InvalidInputError, match=rf"^item 16: {TEXT_ERROR}") as caught:
        await workers.aget_text_embedding_batch(texts)
    assert caught.value.index == 16


@pytest.mark.asyncio
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_text_error_index_with_an_embeddings_cache(embedder: E5VEmbedder, asynchronous: bool) -> None:
    cached = E5VEmbedding(embedder=embedder, embed_batch_size=16, embeddings_cache=SimpleKVStore())
    texts = [f"note number {i}" for i in range(20)] + [BAD_TEXT]
    cached.get_text_embedding_batch(texts[16:18])  # the cache passes on only texts 18, 19 and 20 of the last batch
    with pytest.raises(InvalidInputError, match=rf"^item 20: {TEXT_ERROR}") as caught:
        await embed_batch(cached, "texts", texts, asynchronous)
    assert caught.value.index == 20


@pytest.mark.asyncio
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", ["texts", "images"])
async def test_insert_nodes_names_the_bad_node(
    batched: E5VEmbedding, photo_dir: Path, kind: str, asynchronous: bool
) -> None:
    items = with_bad_item(kind, photo_dir, 20)
    index: VectorStoreIndex
    if kind == "texts":
        nodes: list[TextNode] = [TextNode(text=text) for text in items]
        index, error = VectorStoreIndex(nodes=[], embed_model=batched), TEXT_ERROR
    else:
        nodes = [ImageNode(image_path=path) for path in items]
        index = MultiModalVectorStoreIndex(nodes=[], embed_model=batched, image_embed_model=batched)
        error = IMAGE_ERROR
    with pytest.raises(InvalidInputError, match=rf"^item 20: {error}") as caught:
        if asynchronous:
            await index.ainsert_nodes(nodes)
        else:
            index.insert_nodes(nodes)
    assert caught.value.index == 20


def test_embed_image_nodes_names_the_bad_node(batched: E5VEmbedding, photo_dir: Path) -> None:
    nodes = [ImageNode(image_path=path, text="a photo") for path in with_bad_item("images", photo_dir, 20)]
    with pytest.raises(InvalidInputError, match=rf"^item 20: {IMAGE_ERROR}") as caught:
        batched.embed_image_nodes(nodes)
    assert caught.value.index == 20


# -- interleaved image nodes ------------------------------------------------------------------


def test_image_node_with_text_is_one_interleaved_vector(
    model: E5VEmbedding, embedder: E5VEmbedder, photo_dir: Path
) -> None:
    cat = photo_dir / "cat.png"
    node = ImageNode(image_path=str(cat), text="A cat on a rug.", metadata={"file": "cat.png"})
    content = node.get_content(metadata_mode=MetadataMode.EMBED)
    assert content == "file: cat.png\n\nA cat on a rug."
    expected = embedder.embed_interleaved([Interleaved([cat, content])])
    assert_vectors([model.embed_image_node(node)], expected)
    assert_vectors([model.get_interleaved_embedding([cat, content])], expected)
    image_only = embedder.embed_images([str(cat)])
    assert np.abs(expected - image_only).max() > 1e-3


def test_image_node_sources_and_text_free_nodes(model: E5VEmbedding, embedder: E5VEmbedder, photo_dir: Path) -> None:
    cat, coffee = photo_dir / "cat.png", photo_dir / "coffee.png"
    encoded = base64.b64encode(cat.read_bytes()).decode()
    nodes = [
        ImageNode(image=encoded, text="A cat."),
        ImageDocument(image_path=str(cat), text="A cat."),
        ImageNode(image_path=str(coffee)),  # no text: the plain image vector
    ]
    interleaved = embedder.embed_interleaved([Interleaved([cat, "A cat."])])
    assert_vectors(
        model.embed_image_nodes(nodes), np.vstack([interleaved, interleaved, embedder.embed_images([coffee])])
    )


def test_image_nodes_are_batched(counting: CountingEmbedder, photo_dir: Path) -> None:
    adapter = E5VEmbedding(embedder=counting, embed_batch_size=2)
    nodes = [ImageNode(image_path=file, text=f"photo {i}") for i, file in enumerate(paths(photo_dir))]
    assert len(adapter.embed_image_nodes(nodes)) == 5
    assert [(method, size) for method, size, _ in counting.calls] == [("mixed", 5)]
    assert counting.forward_sizes == [2, 2, 1]


@pytest.mark.parametrize(
    ("node", "message"),
    [
        (ImageNode(image_url="https://example.com/cat.png", text="x"), r"item 0: node .* has only image_url"),
        (ImageNode(text="x"), r"item 0: node .* has no image"),
        (ImageNode(image="not base64!", text="x"), r"item 0: node .* not valid base64"),
    ],
)
def test_image_node_without_a_usable_image(model: E5VEmbedding, node: ImageNode, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        model.embed_image_node(node)


# -- a multimodal index on Chroma ------------------------------------------------------------


@pytest.fixture(scope="module")
def chroma_index(
    model: E5VEmbedding, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[MultiModalVectorStoreIndex, chromadb.ClientAPI]:
    documents: list[Document] = [
        ImageDocument(image_path=str(photo_dir / f"{name}.png"), metadata={"file": name}) for name in IMAGES
    ]
    captioned = ImageDocument(image_path=str(photo_dir / "logo.png"), text=CAPTION, metadata={"file": "logo"})
    captioned.embedding = model.embed_image_node(captioned)
    documents += [captioned, *(Document(text=text) for text in TEXTS)]
    client = chromadb.PersistentClient(path=str(tmp_path_factory.mktemp("chroma")))
    cosine = {"hnsw:space": "cosine"}
    storage_context = StorageContext.from_defaults(
        vector_store=ChromaVectorStore(chroma_collection=client.get_or_create_collection("texts", metadata=cosine)),
        image_store=ChromaVectorStore(chroma_collection=client.get_or_create_collection("images", metadata=cosine)),
    )
    index = MultiModalVectorStoreIndex.from_documents(
        documents, storage_context=storage_context, embed_model=model, image_embed_model=model
    )
    return index, client


def chroma_score(query: np.ndarray, vector: np.ndarray) -> float:
    """LlamaIndex's Chroma score for a cosine collection: exp(-cosine distance)."""
    return math.exp(-(1.0 - float(query @ vector)))


def test_one_model_serves_both_roles_and_stores_core_vectors(
    chroma_index: tuple[MultiModalVectorStoreIndex, Any], model: E5VEmbedding, embedder: E5VEmbedder, photo_dir: Path
) -> None:
    index, client = chroma_index
    assert index.image_embed_model is model
    assert index._embed_model is model
    stored = client.get_collection("images").get(include=["embeddings", "metadatas"])
    by_file = {meta["file"]: vector for meta, vector in zip(stored["metadatas"], stored["embeddings"])}
    assert sorted(by_file) == sorted([*IMAGES, "logo"])
    np.testing.assert_allclose(
        np.vstack([by_file[name] for name in IMAGES]), embedder.embed_images(paths(photo_dir)), rtol=0, atol=1e-6
    )
    logo_content = f"file: logo\n\n{CAPTION}"
    interleaved = embedder.embed_interleaved([Interleaved([photo_dir / "logo.png", logo_content])])
    np.testing.assert_allclose(np.asarray(by_file["logo"])[None], interleaved, rtol=0, atol=1e-6)
    # LlamaIndex also stores an image node that has text in the text store, with its preset vector
    texts = client.get_collection("texts").get(include=["embeddings", "documents"])
    by_text = dict(zip(texts["documents"], texts["embeddings"]))
    assert sorted(by_text) == sorted([*TEXTS, CAPTION])
    np.testing.assert_allclose(np.asarray(by_text[CAPTION])[None], interleaved, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        np.vstack([by_text[text] for text in TEXTS]), embedder.embed_texts(list(TEXTS)), rtol=0, atol=1e-6
    )


def test_text_to_image_retrieval_ranks_by_cosine(
    chroma_index: tuple[MultiModalVectorStoreIndex, Any], embedder: E5VEmbedder, photo_dir: Path
) -> None:
    index, _ = chroma_index
    results = index.as_retriever(image_similarity_top_k=3).text_to_image_retrieve("a cat")
    query = embedder.embed_texts(["a cat"])[0]
    gallery = dict(zip(IMAGES, embedder.embed_images(paths(photo_dir))))
    gallery["logo"] = embedder.embed_interleaved([Interleaved([photo_dir / "logo.png", f"file: logo\n\n{CAPTION}"])])[0]
    expected = sorted(gallery, key=lambda name: -float(query @ gallery[name]))[:3]
    assert [result.node.metadata["file"] for result in results] == expected
    assert all(isinstance(result.node, ImageNode) for result in results)
    for result in results:
        assert result.score == pytest.approx(chroma_score(query, gallery[result.node.metadata["file"]]), abs=1e-5)


def test_image_queried_by_itself_ranks_first(
    chroma_index: tuple[MultiModalVectorStoreIndex, Any], photo_dir: Path
) -> None:
    index, _ = chroma_index
    retriever = index.as_retriever(image_similarity_top_k=3)
    for name in ("rocket", "camera"):
        results = retriever.image_to_image_retrieve(str(photo_dir / f"{name}.png"))
        assert results[0].node.metadata["file"] == name
        assert results[0].score == pytest.approx(1.0, abs=1e-5)
        assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


def test_text_retrieval_returns_ranked_text_nodes(chroma_index: tuple[MultiModalVectorStoreIndex, Any]) -> None:
    index, _ = chroma_index
    results = index.as_retriever(similarity_top_k=2).text_retrieve(TEXTS[2])
    assert results[0].node.get_content() == TEXTS[2]
    assert results[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(results) == 2 and results[0].score >= results[1].score


@pytest.mark.asyncio
async def test_async_retrieval_matches_sync(chroma_index: tuple[MultiModalVectorStoreIndex, Any]) -> None:
    retriever = chroma_index[0].as_retriever(similarity_top_k=2, image_similarity_top_k=3)
    sync = retriever.text_to_image_retrieve("a rocket launch")
    asynchronous = await retriever.atext_to_image_retrieve("a rocket launch")
    assert [r.node.node_id for r in asynchronous] == [r.node.node_id for r in sync]
    assert [r.score for r in asynchronous] == pytest.approx([r.score for r in sync], abs=1e-9)


# -- the example ----------------------------------------------------------------------------------


def test_example_searches_photos_and_texts(tiny_path: Path, tmp_path: Path) -> None:
    persist = tmp_path / "chroma"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPO / "examples" / "llamaindex_multimodal.py"), "--model", str(tiny_path)]
    done = subprocess.run(
        [*command, "--persist-dir", str(persist), "--top-k", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Indexed 5 photos and 4 notes into Chroma at {persist}" in done.stdout
    blocks = [block.splitlines() for block in done.stdout.strip().split("\n\n")[1:]]
    titles = [block[0] for block in blocks]
    assert [title.split(":")[0] for title in titles] == ["Text -> images"] * 3 + ["Image -> images"] + [
        "Text -> texts"
    ] * 3
    for block in blocks:
        rows = [re.fullmatch(r"  (\d)\. (\d\.\d{4})  (.+)", line) for line in block[1:]]
        assert all(rows) and [int(row[1]) for row in rows] == [1, 2, 3], block
        scores = [float(row[2]) for row in rows]
        assert scores == sorted(scores, reverse=True)
    self_query = blocks[3]
    assert self_query[0] == "Image -> images: chelsea.png"
    assert self_query[1] == "  1. 1.0000  chelsea.png"
    client = chromadb.PersistentClient(path=str(persist))
    assert (client.get_collection("images").count(), client.get_collection("texts").count()) == (5, 5)  # + the caption
