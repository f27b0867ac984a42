"""Retrieval over mixed texts and images with E5-V in LangChain.

Stores ``examples/data``'s notes and photos in one in-memory Chroma collection (nothing is
written to disk), then prints the ranked results of text queries (through a LangChain
retriever in an LCEL chain), of an image query and of an interleaved (image + text) query.

Needs ``langchain-e5v`` and ``langchain-chroma``. None of this repository's packages is on
PyPI, so install the core (``.``) and the integration by path, from the repository root::

    pip install torch==2.13.0 . ./integrations/langchain langchain-chroma
    python examples/langchain_rag.py                          # royokong/e5-v (GPU advised)
    python examples/langchain_rag.py --model ./tiny-e5v -k 3  # any local checkpoint
    E5V_API_KEY=... python examples/langchain_rag.py --base-url http://127.0.0.1:8000  # an `e5v serve`

With ``--base-url`` the server embeds (its key from ``E5V_API_KEY``) and nothing is loaded
here. On a GPU machine install the CUDA build of torch first, then run the install without
``torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import chromadb
from chromadb.config import Settings
from langchain_chroma import Chroma
from langchain_core.documents import Document
from langchain_core.runnables import RunnableLambda

from e5v import DEFAULT_MODEL, E5VError
from langchain_e5v import E5VEmbeddings

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = ["chelsea.png", "astronaut.jpg", "rocket.jpg", "coffee.jpg", "horse.png"]
NOTES = ["cats.md", "espresso.txt", "horses.txt", "space-flight.md"]
QUERIES = ["a cat", "space exploration", "a hot drink"]


def ranked(documents: list[Document]) -> list[str]:
    """One line per result: rank, kind (text or image) and source."""
    return [f"{rank}. {doc.metadata['kind']} {doc.metadata['source']}" for rank, doc in enumerate(documents, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"hub id or local checkpoint (default: {DEFAULT_MODEL})")
    parser.add_argument("--base-url", default=None, help="embed through the e5v serve at this URL instead")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: CUDA when available)")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16, float32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("-k", type=int, default=3, help="results per query (default: %(default)s)")
    parser.add_argument("--query", action="append", help="a text query (repeatable; default: a few examples)")
    args = parser.parse_args()
    if args.base_url and (args.model or args.device or args.dtype):
        parser.error("--base-url embeds with the server's model: drop --model, --device and --dtype")
    logging.basicConfig(level=logging.WARNING)

    if args.base_url:
        embeddings = E5VEmbeddings(base_url=args.base_url, batch_size=4)
    else:
        model = args.model or DEFAULT_MODEL
        embeddings = E5VEmbeddings(model_name=model, device=args.device, dtype=args.dtype, batch_size=4)
    store = Chroma(
        collection_name="e5v-langchain-rag",
        embedding_function=embeddings,
        client=chromadb.EphemeralClient(Settings(anonymized_telemetry=False)),
    )
    store.add_texts(
        [(DATA / "notes" / name).read_text(encoding="utf-8") for name in NOTES],
        metadatas=[{"kind": "text", "source": name} for name in NOTES],
    )
    store.add_images(
        [str(DATA / name) for name in PHOTOS], metadatas=[{"kind": "image", "source": name} for name in PHOTOS]
    )

    chain = store.as_retriever(search_kwargs={"k": args.k}) | RunnableLambda(ranked)
    for query in args.query or QUERIES:
        print(f"query text: {query!r}")
        print("\n".join(chain.invoke(query)))

    print(f"query image: {PHOTOS[0]}")
    print("\n".join(ranked(store.similarity_search_by_image(str(DATA / PHOTOS[0]), k=args.k))))

    interleaved = [str(DATA / PHOTOS[2]), "the same launch, seen at night"]
    print(f"query interleaved: [{PHOTOS[2]}] + {interleaved[1]!r}")
    vector = embeddings.embed_interleaved([interleaved])[0]
    print("\n".join(ranked(store.similarity_search_by_vector(vector, k=args.k))))


if __name__ == "__main__":
    try:
        main()
    except E5VError as exc:  # one line saying what failed and how to fix it, not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
