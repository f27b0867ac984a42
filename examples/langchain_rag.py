"""Retrieval over mixed texts and images with E5-V in LangChain.

Stores a few texts and scikit-image's sample photos in one Chroma collection, then
prints the ranked results of text queries (through a LangChain retriever in an LCEL
chain), of an image query and of an interleaved (image + text) query::

    pip install torch==2.13.0 . ./integrations/langchain langchain-chroma scikit-image  # from the repository root
    python examples/langchain_rag.py                      # royokong/e5-v (GPU advised)
    python examples/langchain_rag.py --model ./tiny -k 3  # any local checkpoint

Needs ``langchain-e5v``, ``langchain-chroma`` and ``scikit-image``; none of this repository's packages
is on PyPI, so the install names the core (``.``) and the integration by path. On a GPU machine
install the CUDA build of torch first, then run the install without ``torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import chromadb
import skimage.data
from chromadb.config import Settings
from langchain_chroma import Chroma
from langchain_core.documents import Document
from langchain_core.runnables import RunnableLambda

from e5v import DEFAULT_MODEL, E5VError
from langchain_e5v import E5VEmbeddings

PHOTOS = ["chelsea.png", "astronaut.png", "rocket.jpg", "coffee.png"]
TEXTS = [
    "A tabby cat looks up, curious.",
    "An astronaut in a white suit poses with the flag.",
    "A rocket stands on the launch pad before lift-off.",
    "A cup of coffee with latte art on a saucer.",
    "Stock markets closed lower on Friday.",
]
QUERIES = ["a cat", "space exploration", "a hot drink"]


def ranked(documents: list[Document]) -> list[str]:
    """One line per result: rank, kind (text or image) and source."""
    return [f"{rank}. {doc.metadata['kind']} {doc.metadata['source']}" for rank, doc in enumerate(documents, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local checkpoint (default: %(default)s)")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: CUDA when available)")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16, float32 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("-k", type=int, default=3, help="results per query (default: %(default)s)")
    parser.add_argument("--query", action="append", help="a text query (repeatable; default: a few examples)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    embeddings = E5VEmbeddings(model_name=args.model, device=args.device, dtype=args.dtype, batch_size=4)
    store = Chroma(
        collection_name="e5v-langchain-rag",
        embedding_function=embeddings,
        client=chromadb.EphemeralClient(Settings(anonymized_telemetry=False)),
    )
    photo_dir = Path(skimage.data.__file__).parent
    store.add_texts(TEXTS, metadatas=[{"kind": "text", "source": text} for text in TEXTS])
    store.add_images(
        [str(photo_dir / name) for name in PHOTOS], metadatas=[{"kind": "image", "source": name} for name in PHOTOS]
    )

    chain = store.as_retriever(search_kwargs={"k": args.k}) | RunnableLambda(ranked)
    for query in args.query or QUERIES:
        print(f"query text: {query!r}")
        print("\n".join(chain.invoke(query)))

    print(f"query image: {PHOTOS[0]}")
    print("\n".join(ranked(store.similarity_search_by_image(str(photo_dir / PHOTOS[0]), k=args.k))))

    interleaved = [str(photo_dir / PHOTOS[2]), "the same launch, seen at night"]
    print(f"query interleaved: [{PHOTOS[2]}] + {interleaved[1]!r}")
    vector = embeddings.embed_interleaved([interleaved])[0]
    print("\n".join(ranked(store.similarity_search_by_vector(vector, k=args.k))))


if __name__ == "__main__":
    try:
        main()
    except E5VError as exc:  # one line saying what failed and how to fix it, not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
