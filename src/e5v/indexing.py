"""Files to index: walking folders, splitting texts into passages, hashing, building records.

Images (``.jpg .jpeg .png .webp .gif .bmp .tif .tiff``) become one record each; texts
(``.txt .md``, UTF-8) become one record per passage. Passages are contiguous,
non-overlapping spans of at most ``max_chars`` characters, cut at paragraph breaks
(blank lines) where the paragraphs fit, else at sentence ends, else at whitespace, and
only as a last resort inside a word. Whitespace between passages belongs to none.
Overlap is left out: every passage is embedded as a whole by E5-V, and each character
is then found in exactly one result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from e5v.errors import InvalidInputError
from e5v.inputs import ImageLoader

__all__ = [
    "DEFAULT_MAX_CHARS",
    "IMAGE_SUFFIXES",
    "TEXT_SUFFIXES",
    "FileRecords",
    "Walked",
    "Passage",
    "Record",
    "SkippedPath",
    "load_file",
    "record_id",
    "sha256_bytes",
    "split_passages",
    "walk",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TEXT_SUFFIXES = frozenset({".txt", ".md"})
#: Default passage size in characters (about 200 tokens of English).
DEFAULT_MAX_CHARS = 800

Kind = Literal["image", "text"]

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
    """One vector to store: an image file, or one passage of a text file."""

    id: str
    kind: Kind
    path: str
    sha256: str
    passage: Passage | None = None

    @property
    def document(self) -> str | None:
        return None if self.passage is None else self.passage.text

    @property
    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"path": self.path, "kind": self.kind, "sha256": self.sha256}
        if self.passage is not None:
            meta.update(passage=self.passage.number, start=self.passage.start, end=self.passage.end)
        return meta


@dataclass(frozen=True)
class FileRecords:
    """A readable file: its content hash and records (none for an empty text)."""

    path: str
    kind: Kind
    sha256: str
    records: tuple[Record, ...] = field(default=())


@dataclass(frozen=True)
class SkippedPath:
    """A path that cannot be indexed, and why."""

    path: str
    reason: str


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
    """What :func:`walk` found: files to index, named paths that cannot be, and the files
    of other types inside folders (left out, for the summary)."""

    files: list[Path]
    skipped: list[SkippedPath]
    ignored: list[Path]


def walk(paths: Iterable[str | Path]) -> Walked:
    """Files to index under ``paths`` (files and folders, recursively), sorted, each once.

    Hidden files and folders (name starting with ``.``) inside folders are left out;
    files of other types are listed as ignored; symlinked folders are not followed. A
    named path that is missing, or a named file of another type, is returned as skipped.
    """
    found: dict[Path, None] = {}
    skipped: list[SkippedPath] = []
    ignored: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(name for name in dirs if not name.startswith("."))
                for name in sorted(files):
                    candidate = Path(root, name)
                    if name.startswith("."):
                        continue
                    if _kind(candidate) is None:
                        ignored.append(candidate)
                    else:
                        found.setdefault(candidate.resolve(), None)
        elif path.is_file():
            if _kind(path) is None:
                supported = ", ".join(sorted(IMAGE_SUFFIXES | TEXT_SUFFIXES))
                skipped.append(SkippedPath(str(path), f"unsupported file type; e5v indexes {supported}"))
            else:
                found.setdefault(path.resolve(), None)
        elif path.exists():
            skipped.append(SkippedPath(str(path), "not a regular file or folder"))
        else:
            skipped.append(SkippedPath(str(path), f"no such file or folder (from {os.getcwd()!r})"))
    return Walked(sorted(found), skipped, ignored)


def _kind(path: Path) -> Kind | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_id(path: str, passage: int | None = None) -> str:
    """A stable id from the file's absolute path and passage number."""
    key = path if passage is None else f"{path}\0{passage}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def load_file(
    path: Path,
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    known: dict[str, str] | None = None,
    images: ImageLoader | None = None,
) -> FileRecords | SkippedPath | None:
    """Read, hash and check one file of :func:`walk`.

    Returns ``None`` when ``known`` (path -> sha256 of what is stored) says the file is
    unchanged, a :class:`SkippedPath` when it cannot be read or decoded, else its records.
    Images are decoded in full to check them, then dropped: they are embedded from the path.
    """
    name = str(path)
    kind = _kind(path)
    if kind is None:
        return SkippedPath(name, "unsupported file type")
    try:
        data = path.read_bytes()
    except OSError as exc:
        return SkippedPath(name, f"cannot read: {exc.strerror or exc}")
    digest = sha256_bytes(data)
    if known is not None and known.get(name) == digest:
        return None
    if kind == "image":
        try:
            (images or ImageLoader()).load(path, 0)
        except InvalidInputError as exc:
            return SkippedPath(name, str(exc).removeprefix("item 0: "))
        return FileRecords(name, kind, digest, (Record(record_id(name), kind, name, digest),))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return SkippedPath(name, f"not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8")
    records = tuple(
        Record(record_id(name, passage.number), kind, name, digest, passage)
        for passage in split_passages(text, max_chars)
    )
    return FileRecords(name, kind, digest, records)
