"""The index pipeline: from files named to records stored, incrementally.

Files are walked (:mod:`e5v.collection.files`), read into records
(:mod:`e5v.collection.records`; a PDF page by page, :mod:`e5v.collection.pages`),
embedded a group at a time along ONE path (:func:`_embed`: the group together, leaving
out the units that fail alone) and written to the store
(:class:`~e5v.collection.repository.Store`), markers last. Through a server whose client
sends several requests at once (``RemoteEmbedder(max_in_flight=N)``), a group holds
enough records for N requests in flight.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from e5v.client import Embedder, RemoteEmbedder
from e5v.collection.files import SUPPORTED_SUFFIXES, SkippedPath, walk
from e5v.collection.pages import PageRecords, read_pages
from e5v.collection.passages import DEFAULT_MAX_CHARS
from e5v.collection.records import (
    DEFAULT_RECORD_KINDS,
    FileRecords,
    PdfFile,
    Record,
    Unchanged,
    load_file,
    record_kinds,
)
from e5v.collection.repository import Store
from e5v.core.inputs import ImageLoader
from e5v.errors import InvalidInputError
from e5v.files import printable_path

__all__ = ["IndexSummary", "index_files"]

logger = logging.getLogger(__name__)

#: Records embedded (and written) together: this many forward batches' worth (through a server
#: taking N requests at once, at least N: each request is one batch).
BATCHES_PER_WRITE = 4
#: PDF pages rendered, embedded and written together (16 renderings: at most 21 MB).
PDF_PAGES_PER_WRITE = 16
#: Unsupported files named in the summary line (the rest are counted).
IGNORED_NAMES_SHOWN = 5

U = TypeVar("U")


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
            f"indexed {self.indexed} file{'' if self.indexed == 1 else 's'} ({self.records} "
            f"record{'' if self.records == 1 else 's'})",
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

    Files are found by :func:`~e5v.collection.files.walk` (``follow_links`` follows links to
    files outside ``paths``). A file whose size, mtime and ctime are those stored is
    skipped unread; else one whose sha256 is the stored one is skipped too, and a
    changed file's records are replaced. ``connect`` loads the model, called only if
    something must be embedded. A path that cannot be indexed is passed to ``report``
    and skipped, and its older records are deleted. ``prune`` deletes the records of
    every stored file that no longer exists. ``batch_size`` is the most items a forward
    pass (``"auto"``: the embedder's); records are embedded and written
    :data:`BATCHES_PER_WRITE` batches' worth at a time, or ``max_in_flight`` batches'
    worth through a :class:`~e5v.client.RemoteEmbedder` that sends more requests at
    once, so that they are all in flight.

    PDFs are read, embedded and written :data:`PDF_PAGES_PER_WRITE` pages at a time,
    each page as the records ``pdf_records`` names (:func:`~e5v.collection.records.record_kinds`;
    default :data:`~e5v.collection.records.DEFAULT_RECORD_KINDS`); a PDF stored as other kinds is
    indexed again. A page that cannot be read is passed to ``report`` (and counted in
    ``pages_failed``) and the rest of its PDF is stored.
    """
    from tqdm.auto import tqdm

    kinds = DEFAULT_RECORD_KINDS if pdf_records is None else record_kinds(pdf_records)
    summary = IndexSummary()

    def fail(skipped: SkippedPath) -> None:
        summary.failed.append(skipped)
        report(skipped)

    def file_failed(file: FileRecords, exc: InvalidInputError) -> None:
        where = f"passage {exc.index}: " if file.kind == "text" and exc.index is not None else ""
        fail(SkippedPath(file.path, where + exc.reason))

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
                for group in _groups(staged, size * _batches_per_write(embedder)):
                    written = _embed(embedder, group, lambda file: _items(file.records), size, file_failed)
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
    marker: tuple[Record, np.ndarray] | None = None
    written: set[str] = set()
    left_out: list[SkippedPath] = []

    def page_failed(page: PageRecords, exc: InvalidInputError) -> None:
        left_out.append(SkippedPath(file.path, f"page {page.page}: {exc.reason}"))

    try:
        for chunk in read_pages(file, kinds, max_chars, PDF_PAGES_PER_WRITE):
            records: list[Record] = []
            vectors: list[np.ndarray] = []
            for page in chunk:
                if page.failure is not None:
                    left_out.append(SkippedPath(file.path, page.failure))  # it names the page
            pages = [page for page in chunk if page.records]
            for page, page_vectors in _embed(embedder, pages, lambda page: page.items, batch_size, page_failed):
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


def _batches_per_write(embedder: Embedder) -> int:
    """Forward batches' worth of records embedded together: :data:`BATCHES_PER_WRITE`, or the
    requests a remote embedder has in flight if more, so that each of them is busy."""
    in_flight = embedder.max_in_flight if isinstance(embedder, RemoteEmbedder) else 1
    return max(BATCHES_PER_WRITE, in_flight)


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
    """What the embedder takes of a file's records: a ``Path`` is an image, a ``str`` a text."""
    return [Path(record.path) if record.passage is None else record.passage.text for record in records]


def _embed(
    embedder: Embedder,
    units: Sequence[U],
    items: Callable[[U], Sequence[Any]],
    batch_size: int,
    failed: Callable[[U, InvalidInputError], None],
) -> list[tuple[U, np.ndarray]]:
    """Embed the items of ``units`` (files, or a PDF's pages) together, each unit's vectors
    in its items' order, leaving out (and passing to ``failed``) each unit that fails alone.

    When an item is bad, the unit holding it is embedded alone (it fails: left out; it does
    not: kept) and the others together again, so that a few bad files cost a few calls, not
    one call a file; an error that names no item, or a unit that embeds alone, sends the rest
    unit by unit."""
    done: dict[int, np.ndarray] = {}
    left = list(range(len(units)))
    while left:
        counts = [len(items(units[number])) for number in left]
        try:
            vectors = embedder.embed([item for number in left for item in items(units[number])], batch_size=batch_size)
        except InvalidInputError as exc:
            suspect = _holding(exc.index, counts)
            logger.debug("a group of %d has a bad item (in unit %s)", len(left), suspect)
            if suspect is None:
                break
            number = left.pop(suspect)
            try:
                done[number] = embedder.embed(list(items(units[number])), batch_size=batch_size)
            except InvalidInputError as alone:
                failed(units[number], alone)
                continue
            break  # it embeds alone: the group failed for another reason
        start = 0
        for number, count in zip(left, counts):
            done[number] = vectors[start : start + count]
            start += count
        left = []
    for number in left:
        try:
            done[number] = embedder.embed(list(items(units[number])), batch_size=batch_size)
        except InvalidInputError as exc:
            failed(units[number], exc)
    return [(units[number], done[number]) for number in sorted(done)]


def _holding(index: int | None, counts: Sequence[int]) -> int | None:
    """Which of consecutive runs of ``counts`` items holds item ``index`` (``None``: none does)."""
    if index is None or index < 0:
        return None
    for position, end in enumerate(itertools.accumulate(counts)):
        if index < end:
            return position
    return None
