"""Records: what is stored of a file, one vector each, and how a file is read into them.

Images (``.jpg .jpeg .png .webp .gif .bmp .tif .tiff``) become one record each; texts
(``.txt .md``, UTF-8) one record per passage (:mod:`e5v.collection.passages`); PDFs
(``.pdf``) are hashed and counted here, and read page by page when they are embedded
(:mod:`e5v.collection.pages`), each page as the record kinds asked (:data:`RECORD_KINDS`).
A record's metadata holds public fields (``path``, ``kind``, ``sha256``, ``page``,
``passage``, ``start``, ``end``) and bookkeeping (:data:`BOOKKEEPING`) that only the
index reads.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from e5v.collection.files import SkippedPath, file_kind, sha256_bytes, stamp
from e5v.collection.passages import DEFAULT_MAX_CHARS, Passage, split_passages
from e5v.core.inputs import ImageLoader
from e5v.errors import ConfigurationError, InvalidInputError, MissingDependencyError
from e5v.files import open_regular
from e5v.pdf import open_pdf

__all__ = [
    "BOOKKEEPING",
    "DEFAULT_RECORD_KINDS",
    "RECORD_KINDS",
    "FileRecords",
    "Kind",
    "PdfFile",
    "Record",
    "Stored",
    "Unchanged",
    "load_file",
    "record_id",
    "record_kinds",
]

Kind = Literal["image", "text", "interleaved"]
#: What a PDF page can become, in the order records are made.
RECORD_KINDS = ("image", "text", "interleaved")
#: The page's rendering and its passages: each page found by its look and by its words,
#: at one pass of the model over each picture.
DEFAULT_RECORD_KINDS = ("image", "text")
#: Metadata fields the index keeps for itself (a file's stamp, which record is a PDF's
#: marker, the kinds its pages were stored as): never shown outside the store.
BOOKKEEPING = frozenset({"stamp", "marker", "pdf_records"})
#: Bytes read at a time to hash a PDF (it is not kept: its pages are read when embedded).
HASH_BLOCK = 1 << 20


def record_kinds(value: str | Iterable[str]) -> tuple[str, ...]:
    """Record kinds from ``"image,text"`` (or an iterable), in :data:`RECORD_KINDS` order;
    :class:`~e5v.errors.ConfigurationError` for an unknown or empty choice."""
    names = [name.strip() for name in (value.split(",") if isinstance(value, str) else value) if name.strip()]
    unknown = sorted({name for name in names if name not in RECORD_KINDS})
    if unknown or not names:
        what = f"unknown PDF record kind {', '.join(map(repr, unknown))}" if unknown else "no PDF record kind given"
        raise ConfigurationError(
            f"{what}: choose one or more of {', '.join(RECORD_KINDS)}, comma-separated "
            f"(e.g. {','.join(DEFAULT_RECORD_KINDS)})"
        )
    return tuple(kind for kind in RECORD_KINDS if kind in names)


@dataclass(frozen=True)
class Record:
    """One vector to store: an image file, one passage of a text file, or one of a PDF
    page's records (``page`` set: its rendering, a passage of its text, or both in one
    interleaved vector, whose ``text`` is the page's).

    A file's marker record alone carries the file's ``stamp``, and it is written after
    the file's other records, so a stored marker with the file's sha256 means every
    record of that content is stored. An image's marker is its record, a text's its
    passage 0; a PDF's is the one record given a stamp (and ``pdf_records``, the kinds
    its pages were stored as), stored with ``marker`` true, the others with it false.
    """

    id: str
    kind: Kind
    path: str
    sha256: str
    passage: Passage | None = None
    stamp: str | None = None
    page: int | None = None
    text: str | None = None
    pdf_records: str | None = None

    @property
    def is_marker(self) -> bool:
        if self.page is not None:
            return self.stamp is not None
        return self.passage is None or self.passage.number == 0

    @property
    def document(self) -> str | None:
        return self.text if self.passage is None else self.passage.text

    @property
    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"path": self.path, "kind": self.kind, "sha256": self.sha256}
        if self.page is not None:
            meta.update(page=self.page, marker=self.is_marker)
        if self.passage is not None:
            meta.update(passage=self.passage.number, start=self.passage.start, end=self.passage.end)
        if self.is_marker and self.stamp is not None:
            meta["stamp"] = self.stamp
        if self.is_marker and self.pdf_records is not None:
            meta["pdf_records"] = self.pdf_records
        return meta


@dataclass(frozen=True)
class FileRecords:
    """A readable file: its content hash and records (none for an empty text)."""

    path: str
    kind: Kind
    sha256: str
    records: tuple[Record, ...] = field(default=())


@dataclass(frozen=True)
class PdfFile:
    """A readable PDF of ``pages`` pages, hashed; its records are made page by page
    when it is embedded (:func:`e5v.collection.pages.read_pages`)."""

    path: str
    sha256: str
    stamp: str
    pages: int


@dataclass(frozen=True)
class Stored:
    """What a store holds of a file: its marker record's id, sha256 and stamp (if any),
    and for a PDF the kinds of records its pages were stored as (``"image,text"``)."""

    id: str
    sha256: str
    stamp: str | None = None
    pdf_records: str | None = None


@dataclass(frozen=True)
class Unchanged:
    """A file whose content is the stored one; ``stamp`` is set when only its stamp changed."""

    path: str
    stamp: str | None = None


def record_id(path: str, part: int | str | None = None) -> str:
    """A stable id from the file's absolute path and the part of it: a passage number,
    or for a PDF page's rendering ``"page 3 image"`` (``"page 3 interleaved"``)."""
    key = path if part is None else f"{path}\0{part}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def load_file(
    path: Path,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    known: Mapping[str, Stored] | None = None,
    images: ImageLoader | None = None,
    pdf_records: Sequence[str] | None = None,
) -> FileRecords | PdfFile | SkippedPath | Unchanged:
    """Read, hash and check one file of :func:`walk`.

    Returns :class:`Unchanged` when ``known`` (path -> what is stored) has the file's
    stamp, or its sha256 (for a PDF, stored as the same ``pdf_records``, the kinds of
    :data:`RECORD_KINDS`); a :class:`SkippedPath` when it is not a regular file or cannot be
    read or decoded; else its records, or for a PDF a :class:`PdfFile` (opened to count
    its pages, then closed). Images are decoded in full to check them, then dropped:
    they are embedded from the path.
    """
    name = str(path)
    kind = file_kind(path)
    if kind is None:
        return SkippedPath(name, "unsupported file type")
    stored = None if known is None else known.get(name)
    if kind == "pdf" and stored is not None and stored.pdf_records != _pdf_option(pdf_records):
        stored = None  # its pages were stored as other kinds of records: index it again
    try:
        with open_regular(path) as handle:
            info = os.fstat(handle.fileno())
            now = stamp(info)
            if stored is not None and stored.stamp == now:
                return Unchanged(name)
            if kind == "pdf":
                return _load_pdf(handle, name, now, stored)
            data = handle.read(info.st_size)
    except InvalidInputError as exc:
        return SkippedPath(name, exc.reason)
    except OSError as exc:
        return SkippedPath(name, f"cannot read: {exc.strerror or exc}")
    digest = sha256_bytes(data)
    if stored is not None and stored.sha256 == digest:
        return Unchanged(name, now)
    if kind == "image":
        try:
            (images or ImageLoader()).load(path, 0)
        except InvalidInputError as exc:
            return SkippedPath(name, exc.reason)
        return FileRecords(name, kind, digest, (Record(record_id(name), kind, name, digest, stamp=now),))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return SkippedPath(name, f"not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8")
    records = tuple(
        Record(record_id(name, passage.number), kind, name, digest, passage, stamp=now)
        for passage in split_passages(text, max_chars)
    )
    return FileRecords(name, kind, digest, records)


def _pdf_option(kinds: Sequence[str] | None) -> str:
    """How the kinds of a PDF's records are stored on its marker: ``"image,text"``."""
    return ",".join(DEFAULT_RECORD_KINDS if kinds is None else kinds)


def _load_pdf(handle: IO[bytes], name: str, now: str, stored: Stored | None) -> PdfFile | SkippedPath | Unchanged:
    """Hash an open PDF block by block, then count its pages (refusing what PDFium cannot open)."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: handle.read(HASH_BLOCK), b""):
        digest.update(block)
        size += len(block)
    if stored is not None and stored.sha256 == digest.hexdigest():
        return Unchanged(name, now)
    if size == 0:
        return SkippedPath(name, "an empty file (0 bytes), not a PDF")
    handle.seek(0)
    try:
        with open_pdf(handle) as pdf:
            pages = len(pdf)
    except (InvalidInputError, MissingDependencyError) as exc:
        return SkippedPath(name, getattr(exc, "reason", str(exc)))
    return PdfFile(name, digest.hexdigest(), now, pages)
