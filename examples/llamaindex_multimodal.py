"""Multimodal document search with E5-V, LlamaIndex and Chroma.

Indexes ``examples/data``'s photos and notes in two Chroma collections (one for texts, one
for images) through one E5-V model, then prints ranked results for text-to-image,
image-to-image and text-to-text queries. One photo carries a caption and is stored as a
single interleaved (image + text) vector. Scores are LlamaIndex's Chroma similarity,
``exp(-cosine distance)``: 1.0 for an identical vector.

Needs ``llama-index-embeddings-e5v`` and ``llama-index-vector-stores-chroma``. None of this
repository's packages is on PyPI, so install the core (``.``) and the integration by path,
from the repository root::

    pip install torch==2.13.0 . ./integrations/llamaindex llama-index-vector-stores-chroma
    python examples/llamaindex_multimodal.py                  # royokong/e5-v (GPU advised)
    python examples/llamaindex_multimodal.py --model ./tiny-e5v --persist-dir ./chroma-demo
    E5V_API_KEY=... python examples/llamaindex_multimodal.py --base-url http://127.0.0.1:8000  # an `e5v serve`

Without ``--persist-dir`` the collections live in a temporary folder, removed at exit. With
``--base-url`` the server embeds (its key from ``E5V_API_KEY``) and nothing is loaded here.
On a GPU machine install the CUDA build of torch first, then run the install without
``torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import chromadb

from e5v import DEFAULT_MODEL, E5VError
from llama_index.core import Document, StorageContext
from llama_index.core.indices import MultiModalVectorStoreIndex
from llama_index.core.schema import ImageDocument, NodeWithScore
from llama_index.embeddings.e5v import E5VEmbedding
from llama_index.vector_stores.chroma import ChromaVectorStore

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = ("chelsea.png", "astronaut.jpg", "rocket.jpg", "coffee.jpg")
CAPTIONED = ("horse.png", "The black silhouette of a horse, walking to the left.")
NOTES = ("cats.md", "espresso.txt", "horses.txt", "space-flight.md")
QUERIES = ("a cat", "a rocket launch", "a hot drink")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help=f"hub id or local path of an E5-V checkpoint (default: {DEFAULT_MODEL})"
    )
    parser.add_argument("--base-url", default=None, help="embed through the e5v serve at this URL instead")
    parser.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    parser.add_argument("--dtype", default=None, help="torch dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="items per model batch")
    parser.add_argument("--top-k", type=int, default=3, help="results per query")
    parser.add_argument("--persist-dir", type=Path, default=None, help="Chroma directory (default: a temporary one)")
    parser.add_argument("--query", action="append", help="a text query (repeatable; default: a few examples)")
    args = parser.parse_args()
    if args.base_url and (args.model or args.device or args.dtype):
        parser.error("--base-url embeds with the server's model: drop --model, --device and --dtype")

    if args.persist_dir is None:
        with tempfile.TemporaryDirectory(prefix="e5v-llamaindex-") as tmp:
            run(args, Path(tmp))
    else:
        run(args, args.persist_dir)


def run(args: argparse.Namespace, persist_dir: Path) -> None:
    if args.base_url:
        embed_model = E5VEmbedding(base_url=args.base_url, embed_batch_size=args.batch_size)
    else:
        model = args.model or DEFAULT_MODEL
        embed_model = E5VEmbedding(model, device=args.device, dtype=args.dtype, embed_batch_size=args.batch_size)

    documents: list[Document] = [ImageDocument(image_path=str(DATA / name), metadata={"file": name}) for name in PHOTOS]
    name, caption = CAPTIONED
    captioned = ImageDocument(image_path=str(DATA / name), text=caption, metadata={"file": name})
    captioned.embedding = embed_model.embed_image_node(captioned)  # one interleaved vector: image + caption
    documents.append(captioned)
    documents += [
        Document(text=(DATA / "notes" / note).read_text(encoding="utf-8"), metadata={"file": note}) for note in NOTES
    ]

    client = chromadb.PersistentClient(path=str(persist_dir))
    cosine = {"hnsw:space": "cosine"}
    storage_context = StorageContext.from_defaults(
        vector_store=ChromaVectorStore(chroma_collection=client.get_or_create_collection("texts", metadata=cosine)),
        image_store=ChromaVectorStore(chroma_collection=client.get_or_create_collection("images", metadata=cosine)),
    )
    index = MultiModalVectorStoreIndex.from_documents(
        documents, storage_context=storage_context, embed_model=embed_model, image_embed_model=embed_model
    )
    retriever = index.as_retriever(similarity_top_k=args.top_k, image_similarity_top_k=args.top_k)
    print(
        f"Indexed {len(PHOTOS) + 1} photos and {len(NOTES)} notes into Chroma at {persist_dir} "
        f"({embed_model.model_name}, {embed_model.embedder.dimension}-d)"
    )

    queries = args.query or QUERIES
    for query in queries:
        show(f"Text -> images: {query!r}", retriever.text_to_image_retrieve(query))
    image_query = DATA / PHOTOS[0]
    show(f"Image -> images: {image_query.name}", retriever.image_to_image_retrieve(str(image_query)))
    for query in queries:
        show(f"Text -> texts: {query!r}", retriever.text_retrieve(query))


def show(title: str, results: list[NodeWithScore]) -> None:
    print(f"\n{title}")
    for rank, result in enumerate(results, start=1):
        label = result.node.metadata.get("file") or result.node.get_content()
        print(f"  {rank}. {result.score:.4f}  {label}")


if __name__ == "__main__":
    try:
        main()
    except E5VError as exc:  # one line saying what failed and how to fix it, not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
