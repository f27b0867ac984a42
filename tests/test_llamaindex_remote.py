"""The LlamaIndex adapter in remote mode: through a real ``e5v serve``, and into a multimodal index on Chroma."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import chromadb
import numpy as np
import pytest
from serving import KEY, free_port, start_server, stop

from e5v import E5VEmbedder, EmbeddingError, Interleaved, InvalidInputError, RemoteEmbedder
from e5v.errors import ConfigurationError
from llama_index.core import Document, StorageContext
from llama_index.core.indices import MultiModalVectorStoreIndex
from llama_index.core.schema import ImageDocument, ImageNode, MetadataMode, TextNode
from llama_index.embeddings.e5v import E5VEmbedding
from llama_index.vector_stores.chroma import ChromaVectorStore

IMAGES = ("cat", "astronaut", "coffee", "rocket", "camera")
TEXTS = (
    "A tabby cat lies on a rug.",
    "An astronaut poses in an orange suit.",
    "A rocket stands on the launch pad.",
    "A cup of coffee on a saucer.",
)
CAPTION = "The scikit-image logo: a snake on a blue and yellow background."
BAD_TEXT = "A cat <image> on a rug."  # e5v rejects a text holding its image placeholder
TEXT_ERROR = r"text .* contains the reserved image placeholder"
BROKEN_ERROR = r"bytes of length \d+ is not a readable image"
MISSING_ERROR = r"image file .*missing\.png' cannot be read"


@pytest.fixture(scope="module")
def server(tiny_path: Path) -> Any:
    process, url = start_server(tiny_path)
    yield url
    stop(process)


@pytest.fixture(scope="module")
def remote(server: str) -> E5VEmbedding:
    return E5VEmbedding(base_url=server, api_key=KEY, embed_batch_size=2)


@pytest.fixture(scope="module")
def batched(server: str) -> E5VEmbedding:
    """LlamaIndex cuts 21 items into batches of 16 and 5."""
    return E5VEmbedding(base_url=server, api_key=KEY, embed_batch_size=16)


@pytest.fixture(scope="module")
def broken_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("broken") / "broken.png"
    path.write_bytes(b"these bytes are not an image")
    return path


def paths(photo_dir: Path, names: tuple[str, ...] = IMAGES) -> list[str]:
    return [str(photo_dir / f"{name}.png") for name in names]


def assert_vectors(actual: Any, expected: np.ndarray) -> None:
    assert all(type(value) is float for row in actual for value in row)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=1e-5)


# -- construction and serialisation ------------------------------------------------------------


def test_remote_adapter_takes_the_servers_model(remote: E5VEmbedding, server: str, tiny_path: Path) -> None:
    assert isinstance(remote.embedder, RemoteEmbedder)
    assert remote.embedder.base_url == remote.base_url == server
    assert remote.model_name == str(tiny_path)
    assert (remote.device, remote.dtype, remote.revision, remote.cache_dir) == (None, None, None, None)
    assert remote.embed_batch_size == 2
    assert E5VEmbedding(base_url=server + "/v1/").embed_batch_size == remote.embedder.info["max_client_batch_size"]


def test_serialised_config_keeps_the_url_and_variable_never_the_key(
    server: str, embedder: E5VEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = E5VEmbedding(base_url=server, api_key=KEY, api_key_env_var="E5V_LLAMA_KEY", embed_batch_size=3)
    config = adapter.to_dict()
    assert (config["base_url"], config["api_key_env_var"], config["embed_batch_size"]) == (server, "E5V_LLAMA_KEY", 3)
    for text in (json.dumps(config), adapter.to_json(), adapter.model_dump_json(), repr(adapter), str(adapter)):
        assert KEY not in text
    monkeypatch.setenv("E5V_LLAMA_KEY", KEY)
    restored = E5VEmbedding.from_dict(config)
    assert (restored.base_url, restored.model_name, restored.embed_batch_size) == (server, adapter.model_name, 3)
    assert_vectors(restored.get_text_embedding_batch(list(TEXTS)), embedder.embed_texts(list(TEXTS)))
    monkeypatch.delenv("E5V_LLAMA_KEY")
    with pytest.raises(ConfigurationError, match=r"needs an API key and none was sent; set \$E5V_LLAMA_KEY"):
        E5VEmbedding.from_dict(config).get_text_embedding("no key")


@pytest.mark.parametrize(
    "options",
    [
        {"device": "cpu"},
        {"dtype": "float32"},
        {"revision": "main"},
        {"cache_dir": "/tmp/hf"},
        {"embedder_kwargs": {"max_batch_tokens": 1024}},
    ],
    ids=lambda options: next(iter(options)),
)
def test_base_url_with_a_loading_option_is_a_value_error(server: str, options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"cannot be combined with base_url= \(the server loads the model"):
        E5VEmbedding(base_url=server, **options)


def test_base_url_conflicts(server: str, embedder: E5VEmbedder) -> None:
    with pytest.raises(ValueError, match=r"either base_url= .* or embedder="):
        E5VEmbedding(base_url=server, embedder=embedder)
    with pytest.raises(ValueError, match="differs from the model of the server"):
        E5VEmbedding("royokong/e5-v", base_url=server)
    with pytest.raises(ValueError, match="pass its base_url= too"):
        E5VEmbedding(embedder=embedder, api_key=KEY)
    with pytest.raises(TypeError, match="for an e5v server pass base_url="):
        E5VEmbedding(embedder=RemoteEmbedder(server, KEY))  # type: ignore[arg-type]


def test_unreachable_server_says_so() -> None:
    with pytest.raises(EmbeddingError, match=r"cannot reach the e5v server .* is `e5v serve` running there"):
        E5VEmbedding(base_url=f"http://127.0.0.1:{free_port()}")


# -- vectors equal the in-process ones --------------------------------------------------------------


def test_text_and_query_vectors_equal_in_process(remote: E5VEmbedding, embedder: E5VEmbedder) -> None:
    expected = embedder.embed_texts(list(TEXTS))
    assert_vectors(remote.get_text_embedding_batch(list(TEXTS)), expected)
    assert_vectors([remote.get_text_embedding(TEXTS[1])], expected[1:2])
    assert_vectors([remote.get_query_embedding(TEXTS[2])], expected[2:3])
    assert remote.get_text_embedding_batch([]) == []


def test_image_vectors_equal_in_process(remote: E5VEmbedding, embedder: E5VEmbedder, photo_dir: Path) -> None:
    files = paths(photo_dir)
    expected = embedder.embed_images(files)
    assert_vectors(remote.get_image_embedding_batch(files), expected)
    streams = [BytesIO(Path(file).read_bytes()) for file in files[:2]]
    assert_vectors(remote.get_image_embedding_batch(streams), expected[:2])
    assert_vectors([remote.get_image_embedding(files[3])], expected[3:4])


@pytest.mark.asyncio
async def test_async_vectors_equal_in_process(remote: E5VEmbedding, embedder: E5VEmbedder, photo_dir: Path) -> None:
    files = paths(photo_dir)
    texts = [*TEXTS, "one more"]
    assert_vectors(await remote.aget_text_embedding_batch(texts), embedder.embed_texts(texts))
    assert_vectors(await remote.aget_image_embedding_batch(files), embedder.embed_images(files))
    assert_vectors([await remote.aget_query_embedding(TEXTS[0])], embedder.embed_texts([TEXTS[0]]))
    assert_vectors([await remote.aget_text_embedding(TEXTS[1])], embedder.embed_texts([TEXTS[1]]))
    assert_vectors([await remote.aget_image_embedding(files[2])], embedder.embed_images([files[2]]))


class NoThreads(ThreadPoolExecutor):
    """An event loop's default executor that fails any work handed to a thread."""

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an async method ran the call on an executor thread")


def test_async_texts_use_the_remote_embedders_async_calls(remote: E5VEmbedding, embedder: E5VEmbedder) -> None:
    async def embed() -> tuple[Any, ...]:
        asyncio.get_running_loop().set_default_executor(NoThreads(max_workers=1))
        return (
            await remote.aget_text_embedding_batch(list(TEXTS)),
            await remote.aget_query_embedding(TEXTS[0]),
            await remote.aget_text_embedding(TEXTS[1]),
        )

    batch, query, text = asyncio.run(embed())
    expected = embedder.embed_texts(list(TEXTS))
    assert_vectors(batch, expected)
    assert_vectors([query, text], expected[:2])


def test_interleaved_and_image_nodes_equal_in_process(
    remote: E5VEmbedding, embedder: E5VEmbedder, photo_dir: Path
) -> None:
    cat, coffee = photo_dir / "cat.png", photo_dir / "coffee.png"
    node = ImageNode(image_path=str(cat), text="A cat on a rug.", metadata={"file": "cat.png"})
    content = node.get_content(metadata_mode=MetadataMode.EMBED)
    expected = embedder.embed_interleaved([Interleaved([cat, content])])
    assert_vectors([remote.embed_image_node(node)], expected)
    assert_vectors([remote.get_interleaved_embedding([cat, content])], expected)
    assert_vectors(
        [remote.get_interleaved_embedding(["A photo:", coffee])], embedder.embed_interleaved([["A photo:", coffee]])
    )
    nodes = [node, ImageNode(image_path=str(coffee)), ImageNode(image_path=str(cat), text="A cat.")]
    assert_vectors(
        remote.embed_image_nodes(nodes),
        np.vstack(
            [expected, embedder.embed_images([coffee]), embedder.embed_interleaved([Interleaved([cat, "A cat."])])]
        ),
    )


# -- errors name the item's index in the caller's list, not in LlamaIndex's batch or the request ------


def with_bad_item(kind: str, photo_dir: Path, bad: str, position: int = 20) -> list[str]:
    """21 valid texts or image paths (repeating), with ``bad`` at ``position``."""
    items = (list(TEXTS) * 6 if kind == "texts" else paths(photo_dir) * 5)[:21]
    items[position] = bad
    return items


async def embed_batch(model: E5VEmbedding, kind: str, items: list[str], asynchronous: bool) -> list[list[float]]:
    if kind == "texts":
        return await model.aget_text_embedding_batch(items) if asynchronous else model.get_text_embedding_batch(items)
    return await model.aget_image_embedding_batch(items) if asynchronous else model.get_image_embedding_batch(items)


@pytest.mark.asyncio
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("bad", ["text", "broken image", "missing image"])
async def test_batch_error_names_item_20(
    batched: E5VEmbedding, photo_dir: Path, broken_png: Path, bad: str, asynchronous: bool
) -> None:
    kind, item, error = {
        "text": ("texts", BAD_TEXT, TEXT_ERROR),
        "broken image": ("images", str(broken_png), BROKEN_ERROR),  # refused by the server
        "missing image": ("images", str(photo_dir / "missing.png"), MISSING_ERROR),  # refused by the client
    }[bad]
    with pytest.raises(InvalidInputError, match=rf"^item 20: (?:{error})") as caught:
        await embed_batch(batched, kind, with_bad_item(kind, photo_dir, item), asynchronous)
    assert type(caught.value) is InvalidInputError
    assert caught.value.index == 20


@pytest.mark.asyncio
@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_index_insert_names_the_bad_image_node(
    batched: E5VEmbedding, photo_dir: Path, broken_png: Path, asynchronous: bool
) -> None:
    nodes = [ImageNode(image_path=path) for path in with_bad_item("images", photo_dir, str(broken_png))]
    index = MultiModalVectorStoreIndex(nodes=[], embed_model=batched, image_embed_model=batched)
    with pytest.raises(InvalidInputError, match=rf"^item 20: (?:{BROKEN_ERROR})") as caught:
        if asynchronous:
            await index.ainsert_nodes(nodes)
        else:
            index.insert_nodes(nodes)
    assert caught.value.index == 20


def test_embed_image_nodes_names_the_bad_node(batched: E5VEmbedding, photo_dir: Path, broken_png: Path) -> None:
    items = with_bad_item("images", photo_dir, str(broken_png))
    with pytest.raises(InvalidInputError, match=rf"^item 20: (?:{BROKEN_ERROR})") as caught:
        batched.embed_image_nodes([ImageNode(image_path=path, text="a photo") for path in items])
    assert caught.value.index == 20


# -- a multimodal index on Chroma, embedded through the server ------------------------------------------


@pytest.fixture(scope="module")
def chroma_index(
    remote: E5VEmbedding, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[MultiModalVectorStoreIndex, chromadb.ClientAPI]:
    client = chromadb.PersistentClient(path=str(tmp_path_factory.mktemp("chroma-remote")))
    cosine = {"hnsw:space": "cosine"}
    storage_context = StorageContext.from_defaults(
        vector_store=ChromaVectorStore(chroma_collection=client.get_or_create_collection("texts", metadata=cosine)),
        image_store=ChromaVectorStore(chroma_collection=client.get_or_create_collection("images", metadata=cosine)),
    )
    files = dict(zip(IMAGES, paths(photo_dir)))
    # each call holds both kinds: LlamaIndex marks a store empty for good after a call without its kind
    documents: list[Document] = [
        Document(text=TEXTS[0]),
        ImageDocument(image_path=files["cat"], metadata={"file": "cat"}),
    ]
    index = MultiModalVectorStoreIndex.from_documents(
        documents, storage_context=storage_context, embed_model=remote, image_embed_model=remote
    )
    captioned = ImageNode(image_path=str(photo_dir / "logo.png"), text=CAPTION, metadata={"file": "logo"})
    captioned.embedding = remote.embed_image_node(captioned)
    images = [ImageNode(image_path=files[name], metadata={"file": name}) for name in IMAGES[1:]]
    index.insert_nodes([*images, captioned, *(TextNode(text=text) for text in TEXTS[1:])])
    return index, client


def test_index_stores_the_in_process_vectors(
    chroma_index: tuple[MultiModalVectorStoreIndex, Any], remote: E5VEmbedding, embedder: E5VEmbedder, photo_dir: Path
) -> None:
    index, client = chroma_index
    assert index.image_embed_model is remote
    assert index._embed_model is remote
    stored = client.get_collection("images").get(include=["embeddings", "metadatas"])
    by_file = {meta["file"]: vector for meta, vector in zip(stored["metadatas"], stored["embeddings"])}
    assert sorted(by_file) == sorted([*IMAGES, "logo"])
    np.testing.assert_allclose(
        np.vstack([by_file[name] for name in IMAGES]), embedder.embed_images(paths(photo_dir)), rtol=0, atol=1e-5
    )
    interleaved = embedder.embed_interleaved([Interleaved([photo_dir / "logo.png", f"file: logo\n\n{CAPTION}"])])
    np.testing.assert_allclose(np.asarray(by_file["logo"])[None], interleaved, rtol=0, atol=1e-5)
    texts = client.get_collection("texts").get(include=["embeddings", "documents"])
    by_text = dict(zip(texts["documents"], texts["embeddings"]))
    assert sorted(by_text) == sorted([*TEXTS, CAPTION])
    np.testing.assert_allclose(
        np.vstack([by_text[text] for text in TEXTS]), embedder.embed_texts(list(TEXTS)), rtol=0, atol=1e-5
    )


def test_retrieval_by_text_ranks_as_in_process(
    chroma_index: tuple[MultiModalVectorStoreIndex, Any], embedder: E5VEmbedder, photo_dir: Path
) -> None:
    retriever = chroma_index[0].as_retriever(similarity_top_k=2, image_similarity_top_k=3)
    query = embedder.embed_texts(["a cat"])[0]
    gallery = dict(zip(IMAGES, embedder.embed_images(paths(photo_dir))))
    gallery["logo"] = embedder.embed_interleaved([Interleaved([photo_dir / "logo.png", f"file: logo\n\n{CAPTION}"])])[0]
    expected = sorted(gallery, key=lambda name: -float(query @ gallery[name]))[:3]
    assert [result.node.metadata["file"] for result in retriever.text_to_image_retrieve("a cat")] == expected
    texts = retriever.text_retrieve(TEXTS[2])
    assert texts[0].node.get_content() == TEXTS[2]
    assert texts[0].score == pytest.approx(1.0, abs=1e-5)


def test_retrieval_by_image_finds_itself(chroma_index: tuple[MultiModalVectorStoreIndex, Any], photo_dir: Path) -> None:
    retriever = chroma_index[0].as_retriever(image_similarity_top_k=3)
    for name in ("rocket", "camera"):
        results = retriever.image_to_image_retrieve(str(photo_dir / f"{name}.png"))
        assert results[0].node.metadata["file"] == name
        assert results[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.asyncio
async def test_async_retrieval_matches_sync(chroma_index: tuple[MultiModalVectorStoreIndex, Any]) -> None:
    retriever = chroma_index[0].as_retriever(similarity_top_k=2, image_similarity_top_k=3)
    sync = retriever.text_to_image_retrieve("a rocket launch")
    asynchronous = await retriever.atext_to_image_retrieve("a rocket launch")
    assert [r.node.node_id for r in asynchronous] == [r.node.node_id for r in sync]
    assert [r.score for r in asynchronous] == pytest.approx([r.score for r in sync], abs=1e-9)
