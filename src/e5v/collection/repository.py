"""Files indexed into, and searched in, a Chroma collection of E5-V vectors.

A collection is created with :class:`chromadb_e5v.E5VEmbeddingFunction`, so its model
name, revision, dtype and prompts are persisted in its configuration; records are
embedded here (batches and progress under our control) and written with
``embeddings=``. Metadata: ``path`` (absolute), ``kind`` (``image``/``text``),
``sha256`` (of the file), and ``passage``, ``start``, ``end`` for text passages, whose
text is the record's document. A PDF's records (kinds ``image``, ``text`` and
``interleaved``, see :mod:`e5v.pdf`) have the PDF's ``path`` and their ``page`` (from 1);
an interleaved record's document is its page's text. Needs ``chromadb`` and ``chromadb-e5v``.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import numpy as np

from e5v.client import Embedder, RemoteEmbedder
from e5v.collection.records import (
    DEFAULT_MAX_CHARS,
    SUPPORTED_SUFFIXES,
    FileRecords,
    PdfFile,
    Record,
    SkippedPath,
    Stored,
    Unchanged,
    load_file,
    printable_path,
    walk,
)
from e5v.core.inputs import ImageLoader
from e5v.defaults import DEFAULT_MODEL
from e5v.errors import E5VError, InvalidInputError
from e5v.optional import require

if TYPE_CHECKING:
    from chromadb.api.models.Collection import Collection

    from e5v.pdf import PageRecords

__all__ = ["Hit", "IndexSummary", "Store", "StoreError", "StoredRecord", "index_files"]

logger = logging.getLogger(__name__)

#: Records embedded (and written) together: this many forward batches' worth.
BATCHES_PER_WRITE = 4
#: PDF pages rendered, embedded and written together (16 renderings: at most 21 MB).
PDF_PAGES_PER_WRITE = 16
#: Unsupported files named in the summary line (the rest are counted).
IGNORED_NAMES_SHOWN = 5
#: Seconds to wait for another e5v process creating the same database or collection.
LOCK_TIMEOUT = 120.0
#: Chroma's rule for a collection's name, checked before anything is created.
COLLECTION_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{1,510}[a-zA-Z0-9]")
#: The lock file, inside the database folder, held while a client opens it or a collection is made.
LOCK_NAME = ".e5v.lock"


class StoreError(E5VError):
    """The collection cannot be used as asked (missing, not made by e5v, of another model),
    or the database failed."""


@dataclass(frozen=True)
class Hit:
    """One search result; ``score`` is the cosine similarity to the query; ``page`` (from
    1) is set for a PDF's records."""

    rank: int
    id: str
    score: float
    kind: str
    path: str
    passage: int | None = None
    start: int | None = None
    end: int | None = None
    text: str | None = None
    page: int | None = None

    def to_dict(self) -> dict[str, Any]:
        keys: tuple[str, ...] = ("rank", "id", "score", "kind", "path")
        if self.page is not None:
            keys += ("page",)
        if self.kind == "text":
            keys += ("passage", "start", "end", "text")
        elif self.kind == "interleaved":
            keys += ("text",)
        return {key: getattr(self, key) for key in keys}

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
            passage=meta.get("passage"),
            start=meta.get("start"),
            end=meta.get("end"),
            text=record.document,
            page=meta.get("page"),
        )


@dataclass(frozen=True)
class StoredRecord:
    """A record as stored: its id, every metadata field, its document (a passage's text),
    ``score`` (cosine similarity to the query) from :meth:`Store.nearest`, and its
    ``vector`` from :meth:`Store.get_records` when asked."""

    id: str
    metadata: dict[str, Any]
    document: str | None = None
    score: float | None = None
    vector: np.ndarray | None = None


@dataclass
class IndexSummary:
    """Counts of files: indexed (and their records), unchanged, empty, failed, pruned, and
    the files of unsupported types that were left out; ``pages_failed``: pages of indexed
    PDFs left out (the rest of each is stored)."""

    indexed: int = 0
    records: int = 0
    unchanged: int = 0
    empty: int = 0
    pruned: int = 0
    failed: list[SkippedPath] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    pages_failed: list[SkippedPath] = field(default_factory=list)

    def line(self) -> str:
        parts = [
            f"indexed {self.indexed} files ({self.records} records)",
            f"skipped {self.unchanged} unchanged",
            f"failed {len(self.failed)}",
        ]
        if self.pages_failed:
            parts.append(f"pages left out {len(self.pages_failed)}")
        if self.empty:
            parts.append(f"empty {self.empty}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} unsupported")
        parts.append(f"pruned {self.pruned}")
        return ", ".join(parts)

    def lines(self) -> list[str]:
        """:meth:`line`, then which files of unsupported types were left out, if any."""
        if not self.ignored:
            return [self.line()]
        shown = ", ".join(printable_path(path) for path in self.ignored[:IGNORED_NAMES_SHOWN])
        more = len(self.ignored) - IGNORED_NAMES_SHOWN
        supported = " ".join(sorted(SUPPORTED_SUFFIXES))
        return [
            self.line(),
            f"unsupported, not indexed: {shown}{f' and {more} more' if more > 0 else ''} (e5v indexes {supported})",
        ]


def _chromadb() -> Any:
    chromadb = require("chromadb", "chroma")
    require("chromadb_e5v", "chroma")  # registers the "e5v" embedding function
    return chromadb


def _http_client(chromadb: Any, url: str) -> Any:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreError(f"--chroma-url must look like http://host:port, got {url!r}")
    try:
        return chromadb.HttpClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https",
        )
    except Exception as exc:  # chromadb raises plain exceptions when the server is unreachable
        raise StoreError(f"cannot reach the Chroma server at {url!r}: {exc}") from None


def model_key(name: str | Path) -> str:
    """How a model is named in a collection: local folders by absolute path."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)


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
                f"--collection {shlex.quote(name)} is not a name Chroma accepts: 3 to 512 letters, digits, '.', '_' "
                "or '-', starting and ending with a letter or digit"
            )
        self._chromadb = _chromadb()
        self.db, self.name, self.url = Path(db).expanduser(), name, url
        self.collection: Collection | None = None
        self.config: dict[str, Any] | None = None
        self._client: Any = None
        if url is not None:
            self._client = _http_client(self._chromadb, url)
        elif not self.db.is_dir():
            if not create:
                hint = f"`e5v index PATH --db {shlex.quote(str(db))}`"
                raise StoreError(f"no database at {str(self.db)!r}; index files first with {hint}")
            if self.db.exists():
                raise StoreError(f"--db {str(self.db)!r} is a file, not a database folder; pick another --db")
            return  # connect() creates the folder once the model has loaded
        with self._locked("opening the database"):
            self._load()
        if self.collection is None and not create:
            raise StoreError(
                f"no collection {name!r} in {self._where!r}; index files first with "
                f"`e5v index PATH --db {shlex.quote(str(url or db))} --collection {shlex.quote(name)}`"
            )

    @property
    def _where(self) -> str:
        return self.url or str(self.db)

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
        """Read the collection and its e5v config from the database (``None`` if missing)."""
        try:
            self.collection = self._client.get_collection(self.name)
        except self._chromadb.errors.NotFoundError:
            self.collection, self.config = None, None
            return
        function = self.collection.configuration_json.get("embedding_function") or {}
        if function.get("name") != "e5v":
            raise StoreError(
                f"collection {self.name!r} in {self._where!r} was not made by e5v (its embedding function is "
                f"{function.get('name')!r}); pick another --collection"
            )
        self.config = function["config"]

    def count(self) -> int:
        """Records in the collection (0 before it exists)."""
        if self.collection is None:
            return 0
        with self._failing("counting records"):
            return self.collection.count()

    def _bound(self) -> dict[str, Any] | None:
        """The config of the model the records were embedded with; ``None`` while there are none."""
        return self.config if self.config is not None and self.count() > 0 else None

    def model(self, requested: str | None = None, revision: str | None = None) -> str:
        """The model to embed with: the one the records were embedded with (``requested``
        must match it), else ``requested``, the empty collection's, or the default.
        Raises :class:`StoreError`."""
        bound = self._bound()
        if bound is None:
            stored = None if self.config is None else self.config["model_name"]
            return model_key(requested or stored or DEFAULT_MODEL)
        stored, stored_revision = bound["model_name"], bound.get("revision")
        if (requested is not None and model_key(requested) != stored) or (
            revision is not None and revision != stored_revision
        ):
            asked = f"{requested or stored!r}" + (f" at revision {revision!r}" if revision else "")
            built = f"{stored!r}" + (f" at revision {stored_revision!r}" if stored_revision else "")
            raise StoreError(
                f"collection {self.name!r} in {self._where!r} holds vectors of {built}, not {asked}: vectors "
                f"of different models do not compare. Leave out --model to use {stored!r}, or pick a new "
                "--collection (or --db) for the other model"
            )
        return stored

    def connect(
        self,
        requested: str | None = None,
        *,
        revision: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | Literal["auto"] = "auto",
        server: str | None = None,
    ) -> Embedder:
        """Load the model (checked by :meth:`model`), or with ``server`` use that ``e5v
        serve`` (its model checked the same way), then create the database and the
        collection if needed, or rebind an empty collection to this model."""
        from chromadb_e5v import E5VEmbeddingFunction
        from e5v.core.prompts import PromptSet

        if server is not None:
            requested = RemoteEmbedder(server).model_name  # the server's model, checked like --model
        name = self.model(requested, revision)
        bound = self._bound()
        if bound is None and self.config is not None and requested is not None:
            self.config = None  # an empty collection: the options asked for, not its old ones
        config = self.config or {}
        prompts = config.get("prompts")
        if server is not None:
            function = E5VEmbeddingFunction(
                name, batch_size=batch_size, prompts=prompts if isinstance(prompts, str) else None, base_url=server
            )
        else:
            function = E5VEmbeddingFunction(
                name,
                device=device,
                # the stored dtype by default: Chroma rebuilds the function from its config
                # on writes, and an equal config shares this model instead of loading another
                dtype=dtype if dtype is not None else config.get("dtype"),
                batch_size=batch_size,
                revision=revision if self.config is None else config.get("revision", revision),
                prompts=PromptSet(**prompts) if isinstance(prompts, dict) else prompts,
            )
        embedder = function.embedder  # loads the model: a failure leaves nothing behind
        seen = None if self.collection is None else self.collection.id
        with self._locked(f"creating the collection {self.name!r}"):
            self._load()  # another process may have made it meanwhile
            if self.collection is not None and self.collection.id != seen:
                theirs, ours = self.config or {}, function.get_config()
                if any(theirs.get(key) != ours.get(key) for key in ("model_name", "revision", "prompts")):
                    raise StoreError(
                        f"another e5v run created collection {self.name!r} in {self._where!r} for "
                        f"{theirs.get('model_name')!r} meanwhile; pick another --collection"
                    )
            elif (
                self.collection is not None
                and self._bound() is None
                and self.collection.configuration_json.get("embedding_function", {}).get("config")
                != function.get_config()
            ):
                logger.info("rebinding the empty collection %r in %s to %s", self.name, self._where, name)
                self._client.delete_collection(self.name)
                self.collection = None
            if self.collection is None:
                self.collection = self._client.create_collection(self.name, embedding_function=function)
                logger.info("created collection %r in %s for %s", self.name, self._where, name)
            else:
                self.collection = self._client.get_collection(self.name, embedding_function=function)
        self.config = function.get_config()
        return embedder

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

    def put(self, records: Sequence[Record], vectors: np.ndarray) -> None:
        """Store records as they are (vectors in record order), deleting nothing."""
        collection = self._connected()
        with self._failing(f"writing {len(records)} records"):
            self._upsert(collection, list(records), vectors, list(range(len(records))))

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
            metadata = dict((got["metadatas"] or [])[number] or {})
            found[id_] = StoredRecord(id_, metadata, (got["documents"] or [])[number], vector=vector)
        return [found[id_] for id_ in dict.fromkeys(ids) if id_ in found]

    def nearest(
        self, vector: np.ndarray, k: int = 10, kind: str | None = None, exclude: Iterable[str] = ()
    ) -> list[StoredRecord]:
        """The ``k`` records nearest to ``vector`` (of ``kind`` if given, none of ``exclude``),
        best first, with every metadata field and their scores."""
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
            StoredRecord(
                id_, dict(metadata or {}), document, round(1.0 - distance / 2 if space == "l2" else 1.0 - distance, 6)
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


def index_files(
    store: Store,
    paths: Sequence[str | Path],
    connect: Callable[[], Embedder],
    *,
    batch_size: int | Literal["auto"] = "auto",
    max_chars: int = DEFAULT_MAX_CHARS,
    pdf_records: Sequence[str] | None = None,
    prune: bool = False,
    follow_links: bool = False,
    progress: bool = True,
    report: Callable[[SkippedPath], None] = lambda _skipped: None,
) -> IndexSummary:
    """Index the images, texts and PDFs under ``paths`` into ``store``, incrementally.

    Files are found by :func:`~e5v.collection.records.walk` (``follow_links`` follows links to
    files outside ``paths``). A file whose size, mtime and ctime are those stored is
    skipped unread; else one whose sha256 is the stored one is skipped too, and a
    changed file's records are replaced. ``connect`` loads the model, called only if
    something must be embedded. A path that cannot be indexed is passed to ``report``
    and skipped, and its older records are deleted. ``prune`` deletes the records of
    every stored file that no longer exists. ``batch_size`` is the most items a forward
    pass (``"auto"``: the embedder's); records are embedded and written
    :data:`BATCHES_PER_WRITE` batches' worth at a time.

    PDFs are read, embedded and written :data:`PDF_PAGES_PER_WRITE` pages at a time,
    each page as the records ``pdf_records`` names (:func:`e5v.pdf.record_kinds`;
    default :data:`e5v.pdf.DEFAULT_RECORD_KINDS`); a PDF stored as other kinds is
    indexed again. A page that cannot be read is passed to ``report`` (and counted in
    ``pages_failed``) and the rest of its PDF is stored.
    """
    from tqdm.auto import tqdm

    from e5v.pdf import DEFAULT_RECORD_KINDS, record_kinds

    kinds = DEFAULT_RECORD_KINDS if pdf_records is None else record_kinds(pdf_records)
    summary = IndexSummary()

    def fail(skipped: SkippedPath) -> None:
        summary.failed.append(skipped)
        report(skipped)

    files, refused, summary.ignored = walk(paths, follow_links=follow_links)
    for skipped in refused:
        fail(skipped)
    known = store.stored()
    staged: list[FileRecords] = []
    pdfs: list[PdfFile] = []
    emptied: list[str] = []
    unchanged: list[Unchanged] = []
    images = ImageLoader()
    for path in tqdm(files, desc="Reading", unit="file", disable=not progress, leave=False):
        loaded = load_file(path, max_chars=max_chars, known=known, images=images, pdf_records=kinds)
        if isinstance(loaded, Unchanged):
            unchanged.append(loaded)
        elif isinstance(loaded, SkippedPath):
            fail(loaded)
        elif isinstance(loaded, PdfFile):
            pdfs.append(loaded)
        elif not loaded.records:
            summary.empty += 1
            emptied.append(loaded.path)
        else:
            staged.append(loaded)
    summary.unchanged = len(unchanged)
    store.restamp(unchanged, known)
    store.remove(path for path in emptied if path in known)

    if staged or pdfs:
        embedder = connect()
        size = embedder.batch_size if batch_size == "auto" else batch_size
        if staged:
            total = sum(len(file.records) for file in staged)
            with tqdm(total=total, desc="Embedding", unit="item", disable=not progress) as bar:
                for group in _groups(staged, size * BATCHES_PER_WRITE):
                    written, failed = _embed_files(embedder, group, size)
                    for skipped in failed:
                        fail(skipped)
                    if written:
                        store.write([file for file, _ in written], np.concatenate([vectors for _, vectors in written]))
                        summary.indexed += len(written)
                        summary.records += sum(len(file.records) for file, _ in written)
                    bar.update(sum(len(file.records) for file in group))
        if pdfs:
            pages = sum(file.pages for file in pdfs)
            with tqdm(total=pages, desc="PDF pages", unit="page", disable=not progress) as bar:
                for file in pdfs:
                    stored, left_out, failure = _index_pdf(store, embedder, file, kinds, max_chars, size, bar.update)
                    if failure is not None:
                        fail(failure)
                    elif stored == 0:
                        summary.empty += 1
                        store.remove([file.path] if file.path in known else [])
                    else:
                        summary.indexed += 1
                        summary.records += stored
                        for skipped in left_out:
                            skipped = SkippedPath(skipped.path, f"{skipped.reason}; the rest of the PDF is indexed")
                            summary.pages_failed.append(skipped)
                            report(skipped)

    store.remove(skipped.path for skipped in summary.failed if skipped.path in known)
    if prune:
        gone = sorted(path for path in store.paths() if not Path(path).exists())
        store.remove(gone)
        summary.pruned = len(gone)
    return summary


def _index_pdf(
    store: Store,
    embedder: Embedder,
    file: PdfFile,
    kinds: Sequence[str],
    max_chars: int,
    batch_size: int,
    advance: Callable[[int], object],
) -> tuple[int, list[SkippedPath], SkippedPath | None]:
    """Embed and store a PDF's pages a chunk at a time: ``(records stored, pages left
    out, why the whole file failed)``.

    Its first record is held back as the marker (with the file's stamp and the record
    kinds) and written last, after the file's other older records are deleted, so that
    an interrupted run leaves the marker missing or older and the next run embeds the
    PDF again. A file that fails, or keeps no record, leaves no record behind.
    """
    from e5v.pdf import read_pages

    marker: tuple[Record, np.ndarray] | None = None
    written: set[str] = set()
    left_out: list[SkippedPath] = []
    try:
        for chunk in read_pages(file, kinds, max_chars, PDF_PAGES_PER_WRITE):
            records: list[Record] = []
            vectors: list[np.ndarray] = []
            for page, page_vectors in _embed_pages(embedder, chunk, batch_size, left_out, file.path):
                records.extend(page.records)
                vectors.extend(page_vectors)
            if marker is None and records:
                first = replace(records.pop(0), stamp=file.stamp, pdf_records=",".join(kinds))
                marker = (first, vectors.pop(0))
            if records:
                store.put(records, np.stack(vectors))
                written.update(record.id for record in records)
            advance(len(chunk))
    except InvalidInputError as exc:
        store.remove([file.path])  # what was written of it
        return 0, [], SkippedPath(file.path, exc.reason)
    if marker is None:  # nothing was written
        failure = SkippedPath(file.path, f"no page could be read ({left_out[0].reason})") if left_out else None
        return 0, [], failure
    store.drop_except(file.path, written | {marker[0].id})
    store.put([marker[0]], marker[1].reshape(1, -1))
    return len(written) + 1, left_out, None


def _embed_pages(
    embedder: Embedder, chunk: list[PageRecords], batch_size: int, left_out: list[SkippedPath], path: str
) -> list[tuple[PageRecords, np.ndarray]]:
    """Embed the pages' items together; if one is bad, page by page, leaving out (and
    adding to ``left_out``) each page that fails to render or to embed."""
    for page in chunk:
        if page.failure is not None:
            left_out.append(SkippedPath(path, page.failure))  # it names the page
    pages = [page for page in chunk if page.records]
    if not pages:
        return []
    try:
        vectors = embedder.embed([item for page in pages for item in page.items], batch_size=batch_size)
    except InvalidInputError:
        logger.debug("a chunk of %d pages of %s has a bad item; embedding page by page", len(pages), path)
    else:
        done, start = [], 0
        for page in pages:
            done.append((page, vectors[start : start + len(page.records)]))
            start += len(page.records)
        return done
    done = []
    for page in pages:
        try:
            done.append((page, embedder.embed(list(page.items), batch_size=batch_size)))
        except InvalidInputError as exc:
            left_out.append(SkippedPath(path, f"page {page.page}: {exc.reason}"))
    return done


def _groups(files: Sequence[FileRecords], size: int) -> Iterator[list[FileRecords]]:
    """Whole files, in groups of at least ``size`` records (but the last)."""
    group: list[FileRecords] = []
    count = 0
    for file in files:
        group.append(file)
        count += len(file.records)
        if count >= size:
            yield group
            group, count = [], 0
    if group:
        yield group


def _items(records: Sequence[Record]) -> list[Any]:
    """What the embedder takes: a ``Path`` is an image, a ``str`` a text."""
    return [Path(record.path) if record.passage is None else record.passage.text for record in records]


def _embed_files(
    embedder: Embedder, files: list[FileRecords], batch_size: int
) -> tuple[list[tuple[FileRecords, np.ndarray]], list[SkippedPath]]:
    """Embed the files' records together; if one item is bad, file by file to find it."""
    records = [record for file in files for record in file.records]
    try:
        vectors = embedder.embed(_items(records), batch_size=batch_size)
    except InvalidInputError:
        logger.debug("a group of %d files has a bad item; embedding file by file", len(files))
    else:
        done, start = [], 0
        for file in files:
            done.append((file, vectors[start : start + len(file.records)]))
            start += len(file.records)
        return done, []
    done, failed = [], []
    for file in files:
        try:
            done.append((file, embedder.embed(_items(file.records), batch_size=batch_size)))
        except InvalidInputError as exc:
            where = f"passage {exc.index}: " if file.kind == "text" and exc.index is not None else ""
            failed.append(SkippedPath(file.path, where + exc.reason))
    return done, failed
