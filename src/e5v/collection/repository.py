"""The Chroma repository of a collection: records written, read and searched by vector.

A collection's binding (:class:`~e5v.collection.binding.Binding`: its model, revision,
dtype and prompts) is persisted in its Chroma configuration as the config of the
embedding function named ``"e5v"``, the one :mod:`chromadb_e5v` registers, so plain
Chroma opens it with that function; the store itself embeds nothing through Chroma (the
index passes vectors with ``embeddings=``). Metadata: ``path`` (absolute), ``kind``
(``image``/``text``/``interleaved``), ``sha256`` (of the file), ``passage``, ``start``,
``end`` for text passages, whose text is the record's document, and ``page`` (from 1)
for a PDF's records; bookkeeping (:data:`~e5v.collection.records.BOOKKEEPING`) stays
inside the store. The collection's Chroma metadata holds when it was last written
(:data:`INDEXED_AT`). Needs ``chromadb``.

A collection is bound to its model's identity (:mod:`e5v.model.identity`), not to where
its files lie: the same checkpoint folder by another path, moved or copied, or served by
an ``e5v serve`` under any name, opens it; when the folder is given by a new path, the
binding is updated to it. A collection bound before identities (no ``model_id``) is known
by its folder's path, and gets the folder's identity when the folder is still there.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from e5v.client import API_KEY_ENV_VAR, DEFAULT_MAX_IN_FLIGHT, Embedder, RemoteEmbedder
from e5v.collection.binding import FUNCTION_NAME, Binding, dtype_name, model_key, served_identity
from e5v.collection.records import BOOKKEEPING, FileRecords, Record, Stored, Unchanged
from e5v.core.embedder import E5VEmbedder
from e5v.defaults import DEFAULT_MODEL
from e5v.errors import E5VError, StoreError
from e5v.files import printable_path
from e5v.model.identity import model_identity, short_identity
from e5v.optional import require

if TYPE_CHECKING:
    from chromadb.api.models.Collection import Collection

__all__ = ["INDEXED_AT", "Hit", "Store", "StoredRecord"]

logger = logging.getLogger(__name__)

#: Seconds to wait for another e5v process creating the same database or collection.
LOCK_TIMEOUT = 120.0
#: Chroma's rule for a collection's name, checked before anything is created.
COLLECTION_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]")
#: The lock file, inside the database folder, held while a client opens it or a collection is made.
LOCK_NAME = ".e5v.lock"
#: Metadata fields a hit carries as its own fields; the other public ones are its ``metadata``.
HIT_FIELDS = frozenset({"kind", "path", "passage", "start", "end"})
#: The key of the collection's metadata that holds when records were last written (UTC, ISO 8601).
INDEXED_AT = "e5v_indexed_at"


@dataclass(frozen=True)
class StoredRecord:
    """A record as stored: its id, its public metadata fields (no bookkeeping), its
    document (a passage's text), ``page`` (from 1) when it is one of a PDF page's
    records, ``score`` (cosine similarity to the query) from :meth:`Store.nearest`, and
    its ``vector`` from :meth:`Store.get_records` when asked."""

    id: str
    metadata: dict[str, Any]
    document: str | None = None
    score: float | None = None
    vector: np.ndarray | None = None
    page: int | None = None

    @classmethod
    def of(cls, id_: str, metadata: dict[str, Any] | None, document: str | None, **fields: Any) -> StoredRecord:
        """The record of a row Chroma returned: bookkeeping dropped, the PDF page read from it
        (the index marks every record of a PDF page, and only those)."""
        metadata = dict(metadata or {})
        page = metadata.get("page") if "marker" in metadata else None
        public = {key: value for key, value in metadata.items() if key not in BOOKKEEPING}
        return cls(id_, public, document, page=None if page is None else int(page), **fields)


class Hit(BaseModel):
    """One search result: its rank (from 1), the record's id, ``score`` (cosine similarity
    to the query), kind and path; a PDF page's record has its ``page``; a text passage its
    number, character span and text (an interleaved record its page's text); ``metadata``
    holds the record's other public fields (``sha256``, ``page``, ...)."""

    model_config = ConfigDict(frozen=True)

    rank: int
    id: str
    score: float
    kind: str
    path: str
    page: int | None = None
    passage: int | None = None
    start: int | None = None
    end: int | None = None
    text: str | None = None
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="every other metadata field stored with the record (sha256, page, ...)"
    )

    @classmethod
    def of(cls, rank: int, record: StoredRecord) -> Hit:
        """The hit of a record :meth:`Store.nearest` found, at ``rank``."""
        meta = record.metadata
        return cls(
            rank=rank,
            id=record.id,
            score=float(record.score or 0.0),
            kind=str(meta.get("kind")),
            path=str(meta.get("path")),
            page=record.page,
            passage=meta.get("passage"),
            start=meta.get("start"),
            end=meta.get("end"),
            text=record.document,
            metadata={key: value for key, value in meta.items() if key not in HIT_FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields of its kind (``e5v search --json``): rank, id, score, kind and path; a PDF
        page's ``page``; a passage's number, span and text; an interleaved record's text."""
        keys: tuple[str, ...] = ("rank", "id", "score", "kind", "path")
        if self.page is not None:
            keys += ("page",)
        if self.kind == "text":
            keys += ("passage", "start", "end", "text")
        elif self.kind == "interleaved":
            keys += ("text",)
        return {key: getattr(self, key) for key in keys}


class _BindingFunction:
    """Chroma's view of a binding: an embedding function named ``"e5v"`` whose config is the
    binding's, so the collection's configuration holds it. It embeds nothing: the store
    passes vectors, and Chroma rebuilds :mod:`chromadb_e5v`'s function from this config
    where that package is imported."""

    def __init__(self, binding: Binding) -> None:
        self.binding = binding

    def __call__(self, input: Any) -> Any:
        raise StoreError(
            "e5v's store passes vectors and embeds nothing through Chroma; to embed, open the collection "
            "after `import chromadb_e5v` (pip install ./integrations/chroma)"
        )

    @staticmethod
    def name() -> str:
        return FUNCTION_NAME

    def get_config(self) -> dict[str, Any]:
        return self.binding.to_config()

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> _BindingFunction:
        return _BindingFunction(Binding.from_config(config))

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        Binding.from_config(config)

    def validate_config_update(self, old_config: dict[str, Any], new_config: dict[str, Any]) -> None:
        """Any update: the store checks a new binding (or a rebind) before it persists it."""

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine", "ip", "l2"]

    def is_legacy(self) -> bool:
        return False


@contextmanager
def _registry_kept() -> Iterator[None]:
    """Chroma registers the function of a configuration it writes under its name: keep the
    function registered as ``"e5v"`` before (chromadb_e5v's, which embeds), if any."""
    from chromadb.utils.embedding_functions import known_embedding_functions

    registered = known_embedding_functions.get(FUNCTION_NAME)
    try:
        yield
    finally:
        if registered is not None:
            known_embedding_functions[FUNCTION_NAME] = registered


def _identified(binding: Binding) -> Binding:
    """``binding``, with its model folder's identity if it was bound before identities and the folder is there."""
    if binding.model_id is not None or binding.base_url is not None or not Path(binding.model).is_dir():
        return binding
    return dataclasses.replace(binding, model_id=model_identity(binding.model))


def _chromadb() -> Any:
    return require("chromadb", "chroma")


def _http_client(chromadb: Any, url: str) -> Any:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(f"`url` must look like http://host:port, got {url!r}")
    try:
        return chromadb.HttpClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
        )
    except Exception as exc:  # chromadb raises plain exceptions when the server is unreachable
        raise StoreError(f"cannot reach the Chroma server at {url!r}: {exc}") from None


class Store:
    """An e5v collection in a Chroma database folder (``PersistentClient``), or on a
    Chroma server when ``url`` (``http://host:port``) is given (``HttpClient``).

    ``create=False`` refuses a database folder or collection that does not exist. With
    ``create=True`` nothing is created before :meth:`connect` has loaded the model, so a
    run that fails to load one leaves no folder and no collection behind. A collection
    that holds no records is bound to no model: :meth:`connect` rebinds it to the one asked.
    Processes that open or create the same database folder at once take turns (a file
    lock); a failure of the database raises :class:`StoreError`.
    """

    def __init__(self, db: str | Path, name: str = "e5v", *, create: bool = False, url: str | None = None) -> None:
        if not COLLECTION_NAME.fullmatch(name):
            raise StoreError(
                f"`name` {shlex.quote(name)} is not a name Chroma accepts: 3 to 512 letters, digits, '.', '_' "
                "or '-', starting and ending with a letter or digit"
            )
        self._chromadb = _chromadb()
        self.db, self.name, self.url = Path(db).expanduser(), name, url
        self.collection: Collection | None = None
        self.binding: Binding | None = None
        self._persisted: Binding | None = None  # the binding as the database holds it
        self._client: Any = None
        if url is not None:
            self._client = _http_client(self._chromadb, url)
        elif not self.db.is_dir():
            if not create:
                hint = f"`e5v index PATH --db {shlex.quote(str(db))}`"
                raise StoreError(f"no database at {str(self.db)!r}; index files first with {hint}")
            if self.db.exists():
                raise StoreError(f"`db` {str(self.db)!r} is a file, not a database folder; pick another `db`")
            return  # connect() creates the folder once the model has loaded
        with self._locked("opening the database"):
            self._load()
        if self.collection is None and not create:
            names = self.names()
            held = f"it holds {', '.join(map(repr, names))}" if names else "it holds no collection"
            raise StoreError(
                f"no collection {name!r} in {self._where!r} ({held}); index files first with "
                f"`e5v index PATH {'--chroma-url' if url else '--db'} {shlex.quote(str(url or db))} "
                f"--collection {shlex.quote(name)}`, or pick one of those as `name`"
            )

    @property
    def _where(self) -> str:
        return self.url or str(self.db)

    def names(self) -> list[str]:
        """The names of every collection in this database (or on this Chroma server), sorted."""
        if self._client is None:
            return []
        with self._failing("listing the collections"):
            return sorted(collection.name for collection in self._client.list_collections())

    @contextmanager
    def _failing(self, doing: str) -> Iterator[None]:
        """Chroma's errors while ``doing`` something, as :class:`StoreError`."""
        try:
            yield
        except E5VError:
            raise
        except Exception as exc:  # chromadb raises plain and sqlite exceptions alike
            raise StoreError(
                f"the Chroma database {self._where!r} failed while {doing}: {type(exc).__name__}: {exc}"
            ) from exc

    @contextmanager
    def _locked(self, doing: str) -> Iterator[None]:
        """Open the client and run the block under the database folder's lock (none on a server)."""
        from filelock import FileLock, Timeout

        with self._failing(doing):
            if self.url is not None:
                yield
                return
            self.db.mkdir(parents=True, exist_ok=True)
            try:
                with FileLock(self.db / LOCK_NAME, timeout=LOCK_TIMEOUT):
                    if self._client is None:
                        self._client = self._chromadb.PersistentClient(path=str(self.db))
                    yield
            except Timeout:
                raise StoreError(
                    f"another process has held {str(self.db / LOCK_NAME)!r} for {LOCK_TIMEOUT:.0f} s; wait for it "
                    "to finish, or remove that file if no e5v process is running"
                ) from None

    def _load(self) -> None:
        """Read the collection and its binding from the database (``None`` if missing)."""
        try:
            self.collection = self._client.get_collection(self.name)
        except self._chromadb.errors.NotFoundError:
            self.collection, self.binding, self._persisted = None, None, None
            return
        function = self.collection.configuration_json.get("embedding_function") or {}
        if function.get("name") != FUNCTION_NAME:
            raise StoreError(
                f"collection {self.name!r} in {self._where!r} was not made by e5v (its embedding function is "
                f"{function.get('name')!r}); pick another `name`"
            )
        try:
            self._persisted = Binding.from_config(function.get("config") or {})
        except ValueError as exc:
            raise StoreError(f"collection {self.name!r} in {self._where!r} has a broken e5v binding: {exc}") from None
        self.binding = _identified(self._persisted)

    def count(self) -> int:
        """Records in the collection (0 before it exists)."""
        if self.collection is None:
            return 0
        with self._failing("counting records"):
            return self.collection.count()

    def _bound(self) -> Binding | None:
        """The binding of the model the records were embedded with; ``None`` while there are none."""
        return self.binding if self.binding is not None and self.count() > 0 else None

    def model(self, model: str | RemoteEmbedder | None = None, revision: str | None = None) -> str:
        """The model to embed with: the one the records were embedded with (``model``, a
        name or an ``e5v serve``, must be it: the same identity and revision), found where
        ``model`` says, else ``model``, the empty collection's, or the default. Raises
        :class:`StoreError`."""
        bound = self._bound()
        name = model.model_name if isinstance(model, RemoteEmbedder) else None if model is None else model_key(model)
        if bound is None:
            stored = None if self.binding is None else self.binding.model
            return name or model_key(stored or DEFAULT_MODEL)
        if model is None:
            if revision is not None and revision != bound.revision:
                raise StoreError(self._refusal(bound, bound.model, revision))
            if bound.base_url is None and Path(bound.model).is_absolute() and not Path(bound.model).exists():
                raise StoreError(
                    f"collection {self.name!r} in {self._where!r} was indexed with the model at {bound.model!r}, "
                    f"which is gone; rebind the collection to where it is now with `e5v collections rebind "
                    f"{shlex.quote(self.name)} --model PATH`, or pass that folder as `model`"
                )
            return bound.model
        assert name is not None
        identity = served_identity(model) if isinstance(model, RemoteEmbedder) else model_identity(name)
        asked = dataclasses.replace(bound, model=name, model_id=identity, revision=revision or bound.revision)
        if bound.differences(asked):
            raise StoreError(self._refusal(bound, name, revision, identity))
        return name

    def loader(
        self, model: str, *, device: str | None, dtype: str | None, batch_size: int | Literal["auto"], **options: Any
    ) -> Callable[[], E5VEmbedder]:
        """How to load ``model`` (from :meth:`model`) as the collection's records were embedded:
        its revision and prompts, and its dtype unless ``dtype`` is given; ``options`` go to
        :class:`~e5v.core.embedder.E5VEmbedder` as they are. A server loads with it."""
        binding = self.binding

        def load() -> E5VEmbedder:
            return E5VEmbedder(
                model,
                revision=None if binding is None else binding.revision,
                device=device,
                dtype=dtype if dtype is not None or binding is None else binding.dtype,
                batch_size=batch_size,
                prompts=None if binding is None else binding.prompts,
                **options,
            )

        return load

    def _refusal(self, bound: Binding, name: str, revision: str | None, identity: str | None = None) -> str:
        """The one line that refuses a model whose vectors do not compare with the collection's."""
        built = f"{bound.model!r}" + (f" at revision {bound.revision!r}" if bound.revision else "")
        asked = f"{name!r}" + (f" at revision {revision!r}" if revision else "")
        models = (
            f" (model {short_identity(bound.identity)} is not {short_identity(identity)})"
            if identity and identity != bound.identity
            else ""
        )
        return (
            f"collection {self.name!r} in {self._where!r} holds vectors of {built}, not {asked}{models}: vectors of "
            f"different models do not compare; see which model it holds with `e5v collections info "
            f"{shlex.quote(self.name)}`, leave out `model` to use it, or pick a new `name` for the other model"
        )

    def connect(
        self,
        model: str | None = None,
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | Literal["auto"] = "auto",
        server: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> Embedder:
        """Load the model (checked by :meth:`model`), or with ``server`` use that ``e5v
        serve`` (its model checked the same way, ``max_in_flight`` requests at once: see
        :class:`~e5v.client.RemoteEmbedder`), then create the database and the collection
        if needed, or rebind an empty collection to this model."""
        remote = None if server is None else RemoteEmbedder(server)
        name = self.model(model if remote is None else remote, revision)  # a server's model, checked like any other
        if self._bound() is None and self.binding is not None and (model is not None or remote is not None):
            self.binding = None  # an empty collection: the options asked for, not its old ones
        binding, embedder = self._embedder(name, remote, revision, device, dtype, batch_size, max_in_flight)
        seen = None if self.collection is None else self.collection.id
        with self._locked(f"creating the collection {self.name!r}"):
            self._load()  # another process may have made it meanwhile
            if self.collection is not None and self.collection.id != seen:
                if self.binding is None or not self.binding.compares_with(binding):
                    theirs = None if self.binding is None else self.binding.model
                    raise StoreError(
                        f"another e5v run created collection {self.name!r} in {self._where!r} for "
                        f"{theirs!r} meanwhile; pick another `name`"
                    )
            elif self.collection is not None and self._bound() is None and self.binding != binding:
                logger.info("rebinding the empty collection %r in %s to %s", self.name, self._where, name)
                self._client.delete_collection(self.name)
                self.collection = None
            if self.collection is None:
                function = _BindingFunction(binding)
                with _registry_kept():
                    self.collection = self._client.create_collection(self.name, embedding_function=function)
                logger.info("created collection %r in %s for %s", self.name, self._where, name)
                self._persisted = binding
            else:
                self._follow(binding)
        self.binding = binding
        return embedder

    def _follow(self, binding: Binding) -> None:
        """Persist where the collection's model now lies (a moved or copied folder, or the
        identity of a folder bound before identities), when it is loaded in-process."""
        stored = self._persisted
        if stored is None or stored.base_url is not None or binding.base_url is not None:
            return
        if (stored.model, stored.model_id) != (binding.model, binding.model_id):
            logger.info("collection %r in %s: its model is now at %s", self.name, self._where, binding.model)
            self._persist(dataclasses.replace(stored, model=binding.model, model_id=binding.model_id))

    def _persist(self, binding: Binding) -> None:
        """Write ``binding`` as the collection's (its records are kept)."""
        collection = self._connected()
        with self._failing("recording the collection's model"), _registry_kept():
            collection.modify(configuration={"embedding_function": _BindingFunction(binding)})
        self._persisted = binding

    def _embedder(
        self,
        name: str,
        remote: RemoteEmbedder | None,
        revision: str | None,
        device: str | None,
        dtype: str | None,
        batch_size: int | Literal["auto"],
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> tuple[Binding, Embedder]:
        """The binding to store and the embedder to embed with: the collection's revision,
        dtype and prompts by default. Loads the model (a failure leaves nothing behind)."""
        stored = self.binding
        prompts = None if stored is None else stored.prompts
        if remote is not None:
            preset = prompts if isinstance(prompts, str) else "e5v"
            embedder: Embedder = RemoteEmbedder(remote.base_url, prompts=preset, max_in_flight=max_in_flight)
            binding = Binding(
                name,
                batch_size=batch_size,
                prompts=preset,
                base_url=remote.base_url,
                api_key_env_var=API_KEY_ENV_VAR,
                model_id=served_identity(remote),
            )
            return binding, embedder
        binding = Binding(
            name,
            revision=revision if stored is None else stored.revision,
            dtype=dtype_name(dtype) if dtype is not None else None if stored is None else stored.dtype,
            batch_size=batch_size,
            prompts="e5v" if prompts is None else prompts,
            model_id=model_identity(name),
        )
        local = E5VEmbedder(
            name, device=device, dtype=binding.dtype, revision=binding.revision, prompts=binding.prompt_set
        )
        return binding, local

    def _connected(self) -> Collection:
        if self.collection is None:
            raise E5VError("the store has no collection yet: call connect() first")
        return self.collection

    def stored(self) -> dict[str, Stored]:
        """``path -> what is stored of it``, from each file's marker record.

        A PDF's records other than its marker have ``marker`` false, and are left out
        by ``$ne``, which matches the records without the key (Chroma >= 0.5.12)."""
        found: dict[str, Stored] = {}
        markers = {"$or": [{"kind": "image"}, {"passage": 0}, {"marker": True}]}
        for id_, metadata in self._metadatas(where={"$and": [{"marker": {"$ne": False}}, markers]}):
            stamp, kinds = metadata.get("stamp"), metadata.get("pdf_records")
            found[str(metadata.get("path"))] = Stored(
                id_, str(metadata.get("sha256")), stamp and str(stamp), kinds and str(kinds)
            )
        return found

    def paths(self) -> set[str]:
        """Every path that has a record."""
        return {str(metadata.get("path")) for _, metadata in self._metadatas()}

    def _metadatas(self, where: dict[str, Any] | None = None, page: int = 5000) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.collection is None:
            return
        offset = 0
        while True:
            with self._failing("reading what is stored"):
                got = self.collection.get(where=where, include=["metadatas"], limit=page, offset=offset)
            yield from zip(got["ids"], (metadata or {} for metadata in got["metadatas"] or []))
            if len(got["ids"]) < page:
                return
            offset += page

    def write(self, files: Sequence[FileRecords], vectors: np.ndarray) -> None:
        """Store the files' records (vectors in record order) and drop their older ones.

        Markers go last: first the other records, then the older records are deleted,
        then the markers, so that an interrupted write leaves each file's marker missing
        or older, and the next run embeds that file again.
        """
        collection = self._connected()
        records = [record for file in files for record in file.records]
        order = sorted(range(len(records)), key=lambda number: records[number].is_marker)
        tails = [number for number in order if not records[number].is_marker]
        markers = order[len(tails) :]
        with self._failing(f"writing {len(files)} files"):
            self._upsert(collection, records, vectors, tails)
            for file in files:
                collection.delete(where={"$and": [{"path": file.path}, {"sha256": {"$ne": file.sha256}}]})
            self._upsert(collection, records, vectors, markers)
            self._touch(collection)

    def put(self, records: Sequence[Record], vectors: np.ndarray) -> None:
        """Store records as they are (vectors in record order), deleting nothing."""
        collection = self._connected()
        with self._failing(f"writing {len(records)} records"):
            self._upsert(collection, list(records), vectors, list(range(len(records))))
            self._touch(collection)

    def drop_except(self, path: str, keep: set[str]) -> None:
        """Delete the records of ``path`` whose ids are not in ``keep``."""
        collection = self._connected()
        with self._failing(f"deleting the older records of {printable_path(path)!r}"):
            ids = collection.get(where={"path": path}, include=[])["ids"]
            gone = [id_ for id_ in ids if id_ not in keep]
            for start in range(0, len(gone), 500):
                collection.delete(ids=gone[start : start + 500])

    def _upsert(self, collection: Collection, records: list[Record], vectors: np.ndarray, numbers: list[int]) -> None:
        step = self._client.get_max_batch_size()
        for start in range(0, len(numbers), step):
            part = numbers[start : start + step]
            collection.upsert(
                ids=[records[number].id for number in part],
                embeddings=vectors[part],
                metadatas=[records[number].metadata for number in part],
                documents=[records[number].document for number in part],  # type: ignore[misc]
            )

    def restamp(self, files: Iterable[Unchanged], known: dict[str, Stored]) -> None:
        """Record the new stamps of files whose content is unchanged."""
        changed = [(known[file.path].id, file.stamp) for file in files if file.stamp is not None]
        if not changed or self.collection is None:
            return
        with self._failing("recording file stamps"):
            for start in range(0, len(changed), 500):
                part = changed[start : start + 500]
                self.collection.update(ids=[id_ for id_, _ in part], metadatas=[{"stamp": stamp} for _, stamp in part])

    def remove(self, paths: Iterable[str]) -> None:
        """Delete every record of ``paths``."""
        paths = list(paths)
        if self.collection is None:
            return
        with self._failing(f"deleting the records of {len(paths)} files"):
            for start in range(0, len(paths), 500):
                self.collection.delete(where={"path": {"$in": paths[start : start + 500]}})
            self._touch(self.collection)

    @staticmethod
    def _touch(collection: Collection) -> None:
        """Record in the collection's metadata that its records changed now (:data:`INDEXED_AT`);
        ``hnsw:`` keys stay out (Chroma refuses them in an update; the configuration holds them)."""
        kept = {key: value for key, value in (collection.metadata or {}).items() if not key.startswith("hnsw:")}
        collection.modify(metadata={**kept, INDEXED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds")})

    @property
    def indexed_at(self) -> str | None:
        """When records were last written (UTC, ISO 8601); ``None`` for a collection made before it was recorded."""
        found = None if self.collection is None else (self.collection.metadata or {}).get(INDEXED_AT)
        return None if found is None else str(found)

    def counts(self) -> tuple[dict[str, int], int]:
        """How many records there are of each ``kind``, and how many files they come from."""
        kinds: dict[str, int] = {}
        paths: set[str] = set()
        for _, metadata in self._metadatas():
            kind = str(metadata.get("kind"))
            kinds[kind] = kinds.get(kind, 0) + 1
            paths.add(str(metadata.get("path")))
        return dict(sorted(kinds.items())), len(paths)

    def sample(self, size: int) -> list[StoredRecord]:
        """Up to ``size`` records with their vectors, as many of each kind as there are
        (taken in the store's order), for checking them against another model."""
        by_kind: dict[str, list[str]] = {}
        for id_, metadata in self._metadatas():
            by_kind.setdefault(str(metadata.get("kind")), []).append(id_)
        picked: list[str] = []
        while len(picked) < size and any(by_kind.values()):
            for ids in by_kind.values():
                if ids and len(picked) < size:
                    picked.append(ids.pop(0))
        return self.get_records(picked, vectors=True)

    def rebind(self, binding: Binding) -> None:
        """Bind the collection, records kept, to ``binding`` (checked by the caller:
        :func:`e5v.collection.catalog.rebind` re-embeds a sample first)."""
        self._persist(binding)
        self.binding = binding

    def delete(self) -> None:
        """Delete the collection and every record it holds."""
        if self.collection is None:
            return
        with self._locked(f"deleting the collection {self.name!r}"):
            self._client.delete_collection(self.name)
        logger.info("deleted collection %r in %s", self.name, self._where)
        self.collection, self.binding, self._persisted = None, None, None

    def disk_bytes(self) -> int | None:
        """About how many bytes the collection takes on disk: its vector index files and
        its share (by record count) of the database file; ``None`` on a Chroma server."""
        if self.url is not None or self.collection is None:
            return None
        import sqlite3

        database = (self.db / "chroma.sqlite3").resolve()
        with self._failing("measuring the collection"):
            with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as connection:
                rows = connection.execute("SELECT id FROM segments WHERE collection = ?", (str(self.collection.id),))
                segments = [str(row[0]) for row in rows]
            total = sum(collection.count() for collection in self._client.list_collections())
            own = sum(
                path.stat().st_size for segment in segments for path in (self.db / segment).rglob("*") if path.is_file()
            )
            share = database.stat().st_size * self.collection.count() // total if total else 0
        return own + share

    def query(self, vector: np.ndarray, k: int = 10, kind: str | None = None) -> list[Hit]:
        """The ``k`` records nearest to ``vector`` (of ``kind`` if given), best first."""
        return [Hit.of(rank, record) for rank, record in enumerate(self.nearest(vector, k, kind), 1)]

    def get_records(self, ids: Sequence[str], *, vectors: bool = False) -> list[StoredRecord]:
        """The records of ``ids`` that exist, in the order asked, with their vectors if ``vectors``."""
        collection = self._connected()
        include: list[Any] = ["metadatas", "documents", *(["embeddings"] if vectors else [])]
        with self._failing("reading records"):
            got = collection.get(ids=list(ids), include=include)
        found = {}
        for number, id_ in enumerate(got["ids"]):
            vector = np.asarray(got["embeddings"][number], dtype=np.float32) if vectors else None
            metadata = (got["metadatas"] or [])[number]
            found[id_] = StoredRecord.of(id_, metadata, (got["documents"] or [])[number], vector=vector)
        return [found[id_] for id_ in dict.fromkeys(ids) if id_ in found]

    def nearest(
        self, vector: np.ndarray, k: int = 10, kind: str | None = None, exclude: Iterable[str] = ()
    ) -> list[StoredRecord]:
        """The ``k`` records nearest to ``vector`` (of ``kind`` if given, none of ``exclude``),
        best first, with their public metadata fields and their scores."""
        collection = self._connected()
        left_out = set(exclude)
        with self._failing("searching"):
            count = collection.count()
            if count == 0 or k < 1:
                return []
            found = collection.query(
                query_embeddings=vector.reshape(1, -1),
                n_results=min(k + len(left_out), count),
                where={"kind": kind} if kind else None,
                include=["metadatas", "documents", "distances"],
            )
        space = (collection.configuration_json.get("hnsw") or {}).get("space", "cosine")
        rows = zip(found["ids"][0], found["distances"][0], found["metadatas"][0], found["documents"][0])
        records = [
            StoredRecord.of(
                id_, metadata, document, score=round(1.0 - distance / 2 if space == "l2" else 1.0 - distance, 6)
            )
            for id_, distance, metadata, document in rows
            if id_ not in left_out
        ]
        return records[:k]

    def kinds(self) -> dict[str, int]:
        """How many records there are of each ``kind``."""
        counts: dict[str, int] = {}
        for _, metadata in self._metadatas():
            kind = str(metadata.get("kind"))
            counts[kind] = counts.get(kind, 0) + 1
        return dict(sorted(counts.items()))
