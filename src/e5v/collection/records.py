"""Files to index: walking folders, splitting texts into passages, hashing, building records.

Images (``.jpg .jpeg .png .webp .gif .bmp .tif .tiff``) become one record each; texts
(``.txt .md``, UTF-8) become one record per passage; PDFs (``.pdf``) are read page by
page when they are embedded (:mod:`e5v.pdf`). Passages are contiguous,
non-overlapping spans of at most ``max_chars`` characters, cut at paragraph breaks
(blank lines) where the paragraphs fit, else at sentence ends, else at whitespace, and
only as a last resort inside a word. Whitespace between passages belongs to none.
Overlap is left out: every passage is embedded as a whole by E5-V, and each character
is then found in exactly one result.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from e5v.core.inputs import ImageLoader
from e5v.errors import InvalidInputError

__all__ = [
    "DEFAULT_MAX_CHARS",
    "IMAGE_SUFFIXES",
    "PDF_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TEXT_SUFFIXES",
    "FileRecords",
    "Passage",
    "PdfFile",
    "Record",
    "SkippedPath",
    "Stored",
    "Unchanged",
    "load_file",
    "open_regular",
    "printable_path",
    "record_id",
    "sha256_bytes",
    "split_passages",
    "stamp",
    "walk",
    "Walked",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TEXT_SUFFIXES = frozenset({".txt", ".md"})
PDF_SUFFIXES = frozenset({".pdf"})
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | TEXT_SUFFIXES | PDF_SUFFIXES
#: Default passage size in characters (about 200 tokens of English).
DEFAULT_MAX_CHARS = 800

Kind = Literal["image", "text", "interleaved"]
FileKind = Literal["image", "text", "pdf"]
#: Bytes read at a time to hash a PDF (it is not kept: its pages are read when embedded).
HASH_BLOCK = 1 << 20

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
_CLOSERS = "\"')]\u00bb\u201d\u2019"  # quotes and brackets that may follow a sentence's end
_SENTENCE_END = re.compile(rf"(?:(?<=[.!?\u2026])|(?<=[.!?\u2026][{re.escape(_CLOSERS)}]))\s+")
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Passage:
    """``text == source[start:end]``; ``number`` counts from 0 within its file."""

    number: int
    start: int
    end: int
    text: str


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
    when it is embedded (:func:`e5v.pdf.read_pages`)."""

    path: str
    sha256: str
    stamp: str
    pages: int


@dataclass(frozen=True)
class SkippedPath:
    """A path that cannot be indexed, and why."""

    path: str
    reason: str


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


def split_passages(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[Passage]:
    """Cut ``text`` into passages of at most ``max_chars`` characters (see the module doc)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    pieces: list[tuple[int, int]] = []
    for start, end in _spans(text, 0, len(text), _PARAGRAPH_BREAK):
        pieces.extend(_fit(text, start, end, max_chars))
    passages: list[Passage] = []
    current: tuple[int, int] | None = None
    for start, end in pieces:
        if current is not None and end - current[0] <= max_chars:
            current = (current[0], end)
            continue
        if current is not None:
            passages.append(Passage(len(passages), current[0], current[1], text[current[0] : current[1]]))
        current = (start, end)
    if current is not None:
        passages.append(Passage(len(passages), current[0], current[1], text[current[0] : current[1]]))
    return passages


def _spans(text: str, start: int, end: int, separator: re.Pattern[str]) -> Iterator[tuple[int, int]]:
    """Non-blank spans of ``text[start:end]`` between matches of ``separator``, stripped."""
    position = start
    for match in separator.finditer(text, start, end):
        yield from _stripped(text, position, match.start())
        position = match.end()
    yield from _stripped(text, position, end)


def _stripped(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start < end:
        yield (start, end)


def _fit(text: str, start: int, end: int, max_chars: int) -> Iterator[tuple[int, int]]:
    """Spans of at most ``max_chars``: the whole, else sentences, else words, else cuts."""
    if end - start <= max_chars:
        yield (start, end)
        return
    for separator in (_SENTENCE_END, _WHITESPACE):
        spans = list(_spans(text, start, end, separator))
        if len(spans) > 1:
            for span_start, span_end in spans:
                yield from _fit(text, span_start, span_end, max_chars)
            return
    for cut in range(start, end, max_chars):
        yield (cut, min(cut + max_chars, end))


class Walked(NamedTuple):
    """What :func:`walk` found: files to index, paths that cannot be, and the files of
    other types inside folders (left out, for the summary)."""

    files: list[Path]
    skipped: list[SkippedPath]
    ignored: list[Path]


def walk(paths: Iterable[str | Path], *, follow_links: bool = False) -> Walked:
    """Files to index under ``paths`` (files and folders, recursively), sorted, each once.

    Only regular files are returned, under the path they were found at (a link keeps
    its own name; a file reached twice is listed once, by its own name if it was found
    itself). Inside folders, hidden files and folders (name starting with ``.``) are
    left out, files of other types are listed as ignored, links to folders are not
    followed, and a link to a file outside the given folders is skipped unless
    ``follow_links``. Skipped, with the reason: missing paths, link loops, broken links,
    FIFOs, devices and sockets, names that are not valid UTF-8, unreadable folders.
    A file named in ``paths`` is followed wherever its link points.
    """
    paths = [Path(given).expanduser() for given in paths]
    roots = [Path(os.path.realpath(path)) for path in paths if path.is_dir()]
    chosen: dict[Path, Path] = {}  # the file itself -> the path it is indexed under
    skipped: list[SkippedPath] = []
    ignored: list[Path] = []

    def add(found: tuple[Path, Path] | SkippedPath) -> None:
        if isinstance(found, SkippedPath):
            skipped.append(found)
            return
        path, real = found
        if chosen.setdefault(real, path) != path and path == real:
            chosen[real] = path  # the file itself, rather than a link to it

    def unreadable(exc: OSError) -> None:
        skipped.append(SkippedPath(str(exc.filename), f"cannot list this folder: {exc.strerror or exc}"))

    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path, onerror=unreadable):
                dirs[:] = sorted(name for name in dirs if not name.startswith("."))
                folder = Path(os.path.realpath(root))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    if _kind(Path(name)) is None:
                        ignored.append(Path(root, name))
                    else:
                        add(_regular_file(folder / name, None if follow_links else roots))
        elif not os.path.lexists(path):
            skipped.append(SkippedPath(str(path), f"no such file or folder (from {os.getcwd()!r})"))
        elif _kind(path) is None:
            supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
            skipped.append(SkippedPath(str(path), f"unsupported file type; e5v indexes {supported}"))
        else:
            add(_regular_file(Path(os.path.realpath(path.parent), path.name), None))
    return Walked(sorted(chosen.values()), skipped, ignored)


def _regular_file(path: Path, roots: list[Path] | None) -> tuple[Path, Path] | SkippedPath:
    """``(path, the file it is)`` for a regular file or a link to one (inside ``roots``,
    unless ``None``), else why not; nothing is opened."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return SkippedPath(
            name, "the file name is not valid UTF-8; rename it (e.g. `convmv -f latin1 -t utf-8 --notest FILE`)"
        )
    try:
        info = path.lstat()
        real = path
        if stat.S_ISLNK(info.st_mode):
            real = Path(os.path.realpath(path, strict=True))
            if roots is not None and not any(real.is_relative_to(root) for root in roots):
                return SkippedPath(
                    name,
                    f"a link to {printable_path(real)!r}, outside the folders being indexed: not followed "
                    "(pass --follow-links to index it, or index that file by name)",
                )
            info = real.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return SkippedPath(name, "a symlink loop; fix or remove the link")
        if exc.errno == errno.ENOENT:
            return SkippedPath(name, f"a broken link (to {printable_path(os.readlink(path))!r}); fix or remove it")
        return SkippedPath(name, f"cannot read: {exc.strerror or exc}")
    if not stat.S_ISREG(info.st_mode):
        return SkippedPath(name, f"{_file_type(info.st_mode)}, not a regular file; e5v reads only regular files")
    return path, real


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "a special file"


def printable_path(path: str | Path) -> str:
    """A path as one line of text: odd bytes and line breaks escaped as ``\\xe9``, ``\\n``."""
    text = str(path)
    return text if text.isprintable() else repr(text)[1:-1]


def stamp(info: os.stat_result) -> str:
    """Size, mtime and ctime of a file: while they are unchanged, so is its content."""
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


def _kind(path: Path) -> FileKind | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in PDF_SUFFIXES:
        return "pdf"
    return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_id(path: str, part: int | str | None = None) -> str:
    """A stable id from the file's absolute path and the part of it: a passage number,
    or for a PDF page's rendering ``"page 3 image"`` (``"page 3 interleaved"``)."""
    key = path if part is None else f"{path}\0{part}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading, without blocking (a FIFO put in a file's place cannot
    hang the open); :class:`~e5v.errors.InvalidInputError` unless it is a regular file
    that can be read."""
    try:
        handle = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except OSError as exc:
        raise InvalidInputError(f"cannot read: {exc.strerror or exc}") from None
    mode = os.fstat(handle.fileno()).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        raise InvalidInputError(f"{_file_type(mode)}, not a regular file; e5v reads only regular files")
    return handle


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
    :mod:`e5v.pdf`); a :class:`SkippedPath` when it is not a regular file or cannot be
    read or decoded; else its records, or for a PDF a :class:`PdfFile` (opened to count
    its pages, then closed). Images are decoded in full to check them, then dropped:
    they are embedded from the path.
    """
    name = str(path)
    kind = _kind(path)
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
    from e5v.pdf import DEFAULT_RECORD_KINDS

    return ",".join(DEFAULT_RECORD_KINDS if kinds is None else kinds)


def _load_pdf(handle: IO[bytes], name: str, now: str, stored: Stored | None) -> PdfFile | SkippedPath | Unchanged:
    """Hash an open PDF block by block, then count its pages (refusing what PDFium cannot open)."""
    from e5v.errors import MissingDependencyError
    from e5v.pdf import open_pdf

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
