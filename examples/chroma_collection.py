"""A Chroma collection of photos and notes embedded by E5-V, queried by text, image and composed query.

Needs ``chromadb-e5v`` (e5v and chromadb). None of this repository's packages is on PyPI, so
install the core (``.``) and the integration by path, from the repository root::

    pip install torch==2.13.0 . ./integrations/chroma
    python examples/chroma_collection.py                     # royokong/e5-v (a GPU is advised)
    python examples/chroma_collection.py --model ./tiny-e5v --db ./media-db
    E5V_API_KEY=... python examples/chroma_collection.py --base-url http://127.0.0.1:8000  # an `e5v serve`

The photos and notes are ``examples/data``'s. Without ``--db`` the collection lives in a
temporary folder, removed at exit. With ``--base-url`` the server embeds (its key from
``E5V_API_KEY``) and nothing is loaded here. On a GPU machine install the CUDA build of
torch first, then run the install without ``torch==2.13.0``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import chromadb

from chromadb_e5v import E5VEmbeddingFunction, E5VImageLoader
from e5v import DEFAULT_MODEL, E5VError

DATA = Path(__file__).resolve().parent / "data"
PHOTOS = ["chelsea.png", "astronaut.jpg", "rocket.jpg", "coffee.jpg", "horse.png"]
NOTES = ["cats.md", "espresso.txt", "horses.txt", "space-flight.md"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"hub id or local directory (default: {DEFAULT_MODEL})")
    parser.add_argument("--base-url", default=None, help="embed through the e5v serve at this URL instead")
    parser.add_argument("--db", type=Path, default=None, help="Chroma directory (default: a temporary one)")
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 ... (default: bf16 on GPU, fp32 on CPU)")
    args = parser.parse_args()
    if args.base_url and (args.model or args.device or args.dtype):
        parser.error("--base-url embeds with the server's model: drop --model, --device and --dtype")

    if args.db is None:
        with tempfile.TemporaryDirectory(prefix="e5v-chroma-") as tmp:
            run(args, Path(tmp))
    else:
        run(args, args.db)


def run(args: argparse.Namespace, db: Path) -> None:
    if args.base_url:
        embedding_function = E5VEmbeddingFunction(base_url=args.base_url, batch_size=4)
    else:
        model = args.model or DEFAULT_MODEL
        embedding_function = E5VEmbeddingFunction(model, device=args.device, dtype=args.dtype, batch_size=4)
    client = chromadb.PersistentClient(path=str(db))
    collection = client.get_or_create_collection(
        "media", embedding_function=embedding_function, data_loader=E5VImageLoader()
    )

    add_new(
        collection,
        ids=[f"image:{name}" for name in PHOTOS],
        uris=[str(DATA / name) for name in PHOTOS],
        metadatas=[{"kind": "image", "label": name} for name in PHOTOS],
    )
    add_new(
        collection,
        ids=[f"text:{name}" for name in NOTES],
        documents=[(DATA / "notes" / name).read_text(encoding="utf-8") for name in NOTES],
        metadatas=[{"kind": "text", "label": name} for name in NOTES],
    )
    print(f"collection 'media' in {db}: {collection.count()} items")

    show("query text: 'a cat sleeping'", collection.query(query_texts=["a cat sleeping"], n_results=4))
    show("query image: chelsea.png", collection.query(query_uris=[str(DATA / "chelsea.png")], n_results=4))
    show(
        "query images only, by text: 'a spacecraft'",
        collection.query(query_texts=["a spacecraft"], n_results=3, where={"kind": "image"}),
    )
    composed = embedding_function.embed_composed([str(DATA / "coffee.jpg")], ["make it a cup of tea"])
    show(
        "query composed: coffee.jpg + 'make it a cup of tea'", collection.query(query_embeddings=composed, n_results=3)
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
        print(f"  {rank}. {metadata['kind']} {metadata['label']}  (cosine distance {max(distance, 0.0):.4f})")


if __name__ == "__main__":
    try:
        main()
    except E5VError as exc:  # one line saying what failed and how to fix it, not a traceback
        raise SystemExit(f"{Path(__file__).name}: error: {exc}") from None
