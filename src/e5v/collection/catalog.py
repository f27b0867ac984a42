"""The collections of a database as ``e5v collections`` shows and changes them: each one's
records by kind, model, prompts, size on disk and last write; deleting one; and rebinding
one to a checkpoint its model identity cannot follow (re-saved, converted), once a sample
of its records re-embedded with that checkpoint gives the stored vectors back.

Rebinding re-embeds up to :data:`DEFAULT_SAMPLE` records, as many of each kind as there
are: a passage from its stored text, an image file or a PDF page from its file when the
file still has the indexed content (same sha256). It refuses when a vector's cosine
distance to the stored one (``1 - cosine similarity``) exceeds :data:`DEFAULT_TOLERANCE`,
which leaves room for another device or dtype, not for another model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from e5v.collection.binding import Binding, dtype_name, model_key, prompts_config
from e5v.collection.files import sha256_bytes
from e5v.collection.repository import Store, StoredRecord
from e5v.core.embedder import E5VEmbedder
from e5v.core.inputs import Interleaved
from e5v.core.prompts import PromptSet
from e5v.defaults import DEFAULT_REBIND_SAMPLE as DEFAULT_SAMPLE
from e5v.defaults import DEFAULT_REBIND_TOLERANCE as DEFAULT_TOLERANCE
from e5v.errors import E5VError, InvalidInputError, StoreError
from e5v.files import open_regular
from e5v.model.identity import model_identity
from e5v.pdf import open_pdf

__all__ = [
    "DEFAULT_SAMPLE",
    "DEFAULT_TOLERANCE",
    "CollectionInfo",
    "RebindCheck",
    "collection_info",
    "delete_collection",
    "list_collections",
    "open_database",
    "rebind",
]

logger = logging.getLogger(__name__)


class CollectionInfo(BaseModel):
    """What a collection holds: ``records`` in all, by ``kinds``, from ``files``; its
    model (``model_id``: its identity), revision, dtype, prompts and ``server`` (an ``e5v
    serve`` that embedded it); ``size_bytes`` on disk (about: its vector index and its
    share of the database file; ``None`` on a Chroma server); ``indexed_at``, when records
    were last written (``None``: before this was recorded). ``error`` says why a
    collection that is not e5v's, or whose binding is broken, has nothing else."""

    name: str
    records: int = 0
    kinds: dict[str, int] = {}
    files: int = 0
    model: str | None = None
    model_id: str | None = None
    revision: str | None = None
    dtype: str | None = None
    prompts: str | dict[str, str] | None = None
    server: str | None = None
    size_bytes: int | None = None
    indexed_at: str | None = None
    error: str | None = None


class RebindCheck(BaseModel):
    """How a checkpoint's vectors compared with a collection's stored ones: records
    ``checked`` (and ``skipped``: their file gone or changed), the largest cosine distance
    found (``None``: none checked) against ``tolerance``, and whether the collection is
    now ``bound`` to the checkpoint."""

    model: str
    model_id: str
    checked: int
    skipped: int
    max_distance: float | None
    tolerance: float
    bound: bool


def open_database(db: str | Path, url: str | None = None) -> Store:
    """The database folder ``db`` (or the Chroma server at ``url``) opened, nothing created;
    :class:`~e5v.errors.StoreError` when there is no database there."""
    if url is None and not Path(db).expanduser().is_dir():
        raise StoreError(f"no database at {str(Path(db).expanduser())!r}; index files first with `e5v index PATH`")
    return Store(db, create=True, url=url)


def list_collections(db: str | Path, url: str | None = None) -> list[CollectionInfo]:
    """Every collection of the database, by name."""
    return [collection_info(db, name, url) for name in open_database(db, url).names()]


def collection_info(db: str | Path, name: str, url: str | None = None) -> CollectionInfo:
    """What collection ``name`` holds; :class:`~e5v.errors.StoreError` (listing the
    collections there are) when there is none of that name."""
    try:
        store = Store(db, name, url=url)
    except StoreError as exc:
        if name not in open_database(db, url).names():
            raise
        return CollectionInfo(name=name, error=str(exc))
    binding = store.binding
    kinds, files = store.counts()
    prompts = binding.prompts if binding is not None else None
    return CollectionInfo(
        name=name,
        records=sum(kinds.values()),
        kinds=kinds,
        files=files,
        model=None if binding is None else binding.model,
        model_id=None if binding is None else binding.identity,
        revision=None if binding is None else binding.revision,
        dtype=None if binding is None else binding.dtype,
        prompts=prompts_config(prompts) if isinstance(prompts, PromptSet) else prompts,
        server=None if binding is None else binding.base_url,
        size_bytes=store.disk_bytes(),
        indexed_at=store.indexed_at,
    )


def delete_collection(db: str | Path, name: str, url: str | None = None) -> CollectionInfo:
    """Delete collection ``name`` and its records; what it held. Only e5v's own collections are deleted."""
    info = collection_info(db, name, url)
    if info.error is not None:
        raise StoreError(f"{info.error}; e5v deletes only collections it can read: delete it with Chroma's client")
    Store(db, name, url=url).delete()
    return info


def rebind(
    store: Store,
    model: str | Path,
    *,
    revision: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_size: int | Literal["auto"] = "auto",
    sample: int = DEFAULT_SAMPLE,
    tolerance: float = DEFAULT_TOLERANCE,
    force: bool = False,
) -> RebindCheck:
    """Bind ``store``'s collection to ``model`` once a sample of its records re-embedded
    with it (the collection's prompts; its dtype unless ``dtype``) gives the stored vectors
    back within ``tolerance``; with ``force``, whatever they give. Raises
    :class:`~e5v.errors.StoreError` saying by how much they differ."""
    bound = store.binding
    if bound is None or store.count() == 0:
        raise StoreError(
            f"collection {store.name!r} holds no records, so it is bound to no model yet; index files into it "
            "with `model` instead"
        )
    name = model_key(model)
    records = store.sample(sample)
    items = [_item(record) for record in records]
    usable = [(record, item) for record, item in zip(records, items) if item is not None]
    chosen_dtype = dtype_name(dtype) if dtype is not None else bound.dtype
    embedder = E5VEmbedder(name, revision=revision, device=device, dtype=chosen_dtype, prompts=bound.prompt_set)
    distance = None
    if usable:
        vectors = embedder.embed([item for _, item in usable], batch_size=None if batch_size == "auto" else batch_size)
        stored = np.stack([np.asarray(record.vector) for record, _ in usable])
        cosines = np.sum(vectors * stored, axis=1) / (
            np.linalg.norm(vectors, axis=1) * np.linalg.norm(stored, axis=1) + 1e-12
        )
        distance = float(np.max(1.0 - cosines))
    identity = model_identity(name)
    check = RebindCheck(
        model=name,
        model_id=identity,
        checked=len(usable),
        skipped=len(records) - len(usable),
        max_distance=distance,
        tolerance=tolerance,
        bound=False,
    )
    if not force:
        if distance is None:
            raise StoreError(
                f"none of the {len(records)} sampled records of collection {store.name!r} can be embedded again "
                "(their files are gone or changed), so the model cannot be checked; pass `force` to rebind anyway"
            )
        if distance > tolerance:
            raise StoreError(
                f"the vectors of {name!r} differ from those stored in collection {store.name!r}: cosine distance up "
                f"to {distance:.4g} over {len(usable)} records (tolerance {tolerance:g}), so it is another model; "
                "pass `force` to rebind anyway (the stored vectors will not compare with new ones)"
            )
    store.rebind(
        Binding(
            name,
            revision=revision,
            dtype=chosen_dtype,
            batch_size=bound.batch_size,
            prompts=bound.prompts,
            model_id=identity,
        )
    )
    logger.info("collection %r bound to %s (%s)", store.name, name, identity)
    return check.model_copy(update={"bound": True})


def _item(record: StoredRecord) -> Any | None:
    """What was embedded for ``record``, when it can be had again: a passage's stored text,
    an image file, or a PDF page rendered (with its text, interleaved), from a file that
    still has the indexed sha256; else ``None``."""
    kind = record.metadata.get("kind")
    if kind == "text":
        return record.document
    path = Path(str(record.metadata.get("path")))
    try:
        with open_regular(path) as handle:
            data = handle.read()
    except (InvalidInputError, OSError):
        return None
    if sha256_bytes(data) != record.metadata.get("sha256"):
        return None
    if record.page is None:
        return path if kind == "image" else None
    try:
        with open_regular(path) as handle, open_pdf(handle) as pdf:
            image = pdf.render(record.page)
    except E5VError:
        return None
    if kind == "interleaved":
        return Interleaved([image] if record.document is None else [image, record.document])
    return image
