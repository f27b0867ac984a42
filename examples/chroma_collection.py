"""A Chroma collection of photos and texts embedded by E5-V, queried by text, image and composed query.

pip install torch==2.13.0 . ./integrations/chroma scikit-image   # from the repository root
python examples/chroma_collection.py                     # royokong/e5-v (a GPU is advised)
python examples/chroma_collection.py --model ./tiny --db ./media-db

None of this repository's packages is on PyPI, so the install names the core (``.``) and the
integration by path. On a GPU machine install the CUDA build of torch first, then run the
install without ``torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import chromadb
import skimage

from chromadb_e5v import E5VEmbeddingFunction, E5VImageLoader
from e5v import E5VError

PHOTOS = ["chelsea.png", "astronaut.png", "rocket.jpg", "coffee.png", "motorcycle_left.png"]
TEXTS = [
    "A ginger cat lying down and looking at the camera.",
    "An astronaut in a white spacesuit next to the American flag.",
    "A rocket standing on the launch pad before lift-off.",
    "A cup of coffee with latte art on a saucer.",
    "A red motorcycle parked indoors.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="royokong/e5-v", help="hub id or local directory (default: royokong/e5-v)")
    parser.add_argument("--db", default=None, help="Chroma directory (default: a temporary one)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: bf16 on GPU, fp32 on CPU)")
    args = parser.parse_args()

    db = args.db or tempfile.mkdtemp(prefix="e5v-chroma-")
    embedding_function = E5VEmbeddingFunction(args.model, device=args.device, dtype=args.dtype, batch_size=4)
    client = chromadb.PersistentClient(path=db)
    collection = client.get_or_create_collection(
        "media", embedding_function=embedding_function, data_loader=E5VImageLoader()
    )

    photo_dir = Path(skimage.__file__).parent / "data"
    add_new(
        collection,
        ids=[f"image:{name}" for name in PHOTOS],
        uris=[str(photo_dir / name) for name in PHOTOS],
        metadatas=[{"kind": "image", "label": name} for name in PHOTOS],
    )
    add_new(
        collection,
        ids=[f"text:{i}" for i in range(len(TEXTS))],
        documents=TEXTS,
        metadatas=[{"kind": "text", "label": text} for text in TEXTS],
    )
    print(f"collection 'media' in {db}: {collection.count()} items")

    show("query text: 'a cat sleeping'", collection.query(query_texts=["a cat sleeping"], n_results=4))
    show(
        "query image: chelsea.png",
        collection.query(query_uris=[str(photo_dir / "chelsea.png")], n_results=4),
    )
    show(
        "query images only, by text: 'a spacecraft'",
        collection.query(query_texts=["a spacecraft"], n_results=3, where={"kind": "image"}),
    )
    composed = embedding_function.embed_composed([str(photo_dir / "coffee.png")], ["make it a cup of tea"])
    show(
        "query composed: coffee.png + 'make it a cup of tea'",
        collection.query(query_embeddings=composed, n_results=3),
    )


def add_new(collection: chromadb.Collection, ids: list[str], **fields: list) -> None:
    """Add the records not yet in the collection (Chroma's upsert cannot embed ``uris``)."""
    present = set(collection.get(ids=ids, include=[])["ids"])
    keep = [i for i, record_id in enumerate(ids) if record_id not in present]
    if keep:
        collection.add(ids=[ids[i] for i in keep], **{key: [values[i] for i in keep] for key, values in fields.items()})


def show(title: str, result: chromadb.QueryResult) -> None:
    print(title)
    for rank, (metadata, distance) in enumerate(zip(result["metadatas"][0], result["distances"][0]), start=1):
        label = metadata["label"] if metadata["kind"] == "image" else repr(metadata["label"])
        print(f"  {rank}. {metadata['kind']} {label}  (cosine distance {max(distance, 0.0):.4f})")


if __name__ == "__main__":
    try:
        main()
    except E5VError as exc:  # one line saying what failed and how to fix it, not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
