"""A PDF's pages as records, for the index.

A page becomes the records the kinds ask (:data:`e5v.collection.records.RECORD_KINDS`):
its rendering (kind ``image``, drawn by :meth:`e5v.pdf.Pdf.render` for E5-V's tile
grid), its text cut into passages as text files are (``text``, with the character span
in the page's text) and the rendering and the text as ONE interleaved vector
(``interleaved``). Every record's path is the PDF's, with ``page`` beside it; a PDF's
passages are numbered through the document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e5v.collection.passages import split_passages
from e5v.collection.records import PdfFile, Record, record_id
from e5v.core.inputs import Interleaved
from e5v.errors import InvalidInputError
from e5v.files import open_regular
from e5v.pdf import Pdf, open_pdf

__all__ = ["PageRecords", "page_records", "read_pages"]


@dataclass(frozen=True)
class PageRecords:
    """One page's records and, in the same order, what to embed for each; ``failure``
    says why part of the page is missing (its rendering, or all of it)."""

    page: int
    records: tuple[Record, ...]
    items: tuple[Any, ...]
    failure: str | None = None


def page_records(
    pdf: Pdf, file: PdfFile, page: int, kinds: Sequence[str], max_chars: int, first_passage: int = 0
) -> PageRecords:
    """The records ``kinds`` asks of page ``page``; passages are numbered on from
    ``first_passage`` (a PDF's passages count through the document)."""
    path = file.path
    try:
        text = pdf.text(page)
    except InvalidInputError as exc:
        return PageRecords(page, (), (), exc.reason)
    image = failure = None
    if "image" in kinds or "interleaved" in kinds:
        try:
            image = pdf.render(page)
        except InvalidInputError as exc:
            failure = exc.reason
    records: list[Record] = []
    items: list[Any] = []
    if image is not None and "image" in kinds:
        records.append(Record(record_id(path, f"page {page} image"), "image", path, file.sha256, page=page))
        items.append(image)
    if "text" in kinds:
        for passage in split_passages(text, max_chars):
            passage = dataclasses.replace(passage, number=first_passage + passage.number)
            records.append(Record(record_id(path, passage.number), "text", path, file.sha256, passage, page=page))
            items.append(passage.text)
    if image is not None and "interleaved" in kinds:
        words = text if text.strip() else None
        key = record_id(path, f"page {page} interleaved")
        records.append(Record(key, "interleaved", path, file.sha256, page=page, text=words))
        items.append(Interleaved([image] if words is None else [image, words]))
    return PageRecords(page, tuple(records), tuple(items), failure)


def read_pages(
    file: PdfFile, kinds: Sequence[str], max_chars: int, pages_per_chunk: int
) -> Iterator[list[PageRecords]]:
    """The PDF's pages, ``pages_per_chunk`` at a time, each rendered and read only when
    its chunk is asked for (a long document is never held whole). Raises
    :class:`~e5v.errors.InvalidInputError` when the file can no longer be read as it
    was (its page count changed)."""
    with open_regular(Path(file.path)) as handle, open_pdf(handle) as pdf:
        if len(pdf) != file.pages:
            raise InvalidInputError(
                f"changed while being indexed (now {len(pdf)} pages, was {file.pages}); index again"
            )
        passages = 0
        for start in range(1, file.pages + 1, pages_per_chunk):
            chunk = []
            for page in range(start, min(start + pages_per_chunk, file.pages + 1)):
                records = page_records(pdf, file, page, kinds, max_chars, passages)
                passages += sum(1 for record in records.records if record.passage is not None)
                chunk.append(records)
            yield chunk
