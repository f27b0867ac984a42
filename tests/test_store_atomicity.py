"""A batch with one bad item leaves every store unchanged: LangChain, LlamaIndex, Chroma."""

from __future__ import annotations

from pathlib import Path

import chromadb
import pytest
from langchain_chroma import Chroma
from langchain_core.vectorstores import InMemoryVectorStore

from chromadb_e5v import E5VEmbeddingFunction
from e5v import E5VEmbedder, InvalidInputError
from langchain_e5v import E5VEmbeddings
from llama_index.core import Document, StorageContext
from llama_index.core.indices import MultiModalVectorStoreIndex
from llama_index.core.schema import ImageDocument, ImageNode
from llama_index.embeddings.e5v import E5VEmbedding
from llama_index.vector_stores.chroma import ChromaVectorStore

SETTINGS = chromadb.Settings(anonymized_telemetry=False)


@pytest.fixture
def broken_png(tmp_path: Path, photo_dir: Path) -> Path:
    data = (photo_dir / "cat.png").read_bytes()
    path = tmp_path / "broken.png"
    path.write_bytes(data[: len(data) // 3])
    return path


def test_langchain_stores_are_unchanged_after_a_failed_add(
    embedder: E5VEmbedder, photo_dir: Path, broken_png: Path, tmp_path: Path
) -> None:
    embeddings = E5VEmbeddings(embedder=embedder)
    memory = InMemoryVectorStore(embedding=embeddings)
    memory.add_texts(["a first note"])
    with pytest.raises(InvalidInputError, match=r"^item 1: .*reserved image placeholder"):
        memory.add_texts(["fine", "look at <image> here", "also fine"])
    assert len(memory.store) == 1

    chroma = Chroma(
        collection_name="atomic",
        embedding_function=embeddings,
        persist_directory=str(tmp_path / "lc"),
        client_settings=SETTINGS,
    )
    chroma.add_images([str(photo_dir / "rocket.png")])
    with pytest.raises(InvalidInputError, match=r"^item 1: .*not a readable image"):
        chroma.add_images([str(photo_dir / "cat.png"), str(broken_png), str(photo_dir / "coffee.png")])
    assert chroma._collection.count() == 1


def test_llamaindex_index_is_unchanged_after_a_failed_insert(
    embedder: E5VEmbedder, photo_dir: Path, broken_png: Path, tmp_path: Path
) -> None:
    model = E5VEmbedding(embedder=embedder)
    client = chromadb.PersistentClient(path=str(tmp_path / "li"), settings=SETTINGS)
    texts = client.get_or_create_collection("texts", metadata={"hnsw:space": "cosine"})
    images = client.get_or_create_collection("images", metadata={"hnsw:space": "cosine"})
    storage = StorageContext.from_defaults(
        vector_store=ChromaVectorStore(chroma_collection=texts), image_store=ChromaVectorStore(chroma_collection=images)
    )
    index = MultiModalVectorStoreIndex.from_documents(
        [Document(text="a note about cats"), ImageDocument(image_path=str(photo_dir / "cat.png"), metadata={"f": 1})],
        storage_context=storage,
        embed_model=model,
        image_embed_model=model,
    )
    before = (texts.count(), images.count())
    assert before == (1, 1)
    spoiled = tmp_path / "spoiled.png"
    spoiled.write_bytes((photo_dir / "coffee.png").read_bytes())
    nodes = [ImageNode(image_path=str(photo_dir / "rocket.png")), ImageNode(image_path=str(spoiled))]
    spoiled.write_bytes(broken_png.read_bytes())  # LlamaIndex checks the file when the node is made, e5v when embedding
    with pytest.raises(InvalidInputError, match=r"not a readable image"):
        index.insert_nodes(nodes)
    assert (texts.count(), images.count()) == before


def test_chroma_collection_is_unchanged_after_a_failed_add(embedder: E5VEmbedder, tmp_path: Path) -> None:
    collection = chromadb.PersistentClient(path=str(tmp_path / "ch"), settings=SETTINGS).create_collection(
        "atomic", embedding_function=E5VEmbeddingFunction(embedder=embedder)
    )
    collection.add(ids=["a"], documents=["a first note"])
    with pytest.raises(InvalidInputError):
        collection.add(ids=["b", "c"], documents=["fine", "bad <image> text"])
    assert collection.count() == 1
