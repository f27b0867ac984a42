"""Deprecated: the old ``e5v.indexing``, split into :mod:`e5v.files`,
:mod:`e5v.collection.files`, :mod:`e5v.collection.passages` and
:mod:`e5v.collection.records`; this alias goes in the next release. Import from there."""

import warnings

from e5v.collection.files import (
    IMAGE_SUFFIXES,
    PDF_SUFFIXES,
    SUPPORTED_SUFFIXES,
    TEXT_SUFFIXES,
    SkippedPath,
    Walked,
    sha256_bytes,
    stamp,
    walk,
)
from e5v.collection.passages import DEFAULT_MAX_CHARS, Passage, split_passages
from e5v.collection.records import FileRecords, PdfFile, Record, Stored, Unchanged, load_file, record_id
from e5v.files import open_regular, printable_path

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
    "Walked",
    "load_file",
    "open_regular",
    "printable_path",
    "record_id",
    "sha256_bytes",
    "split_passages",
    "stamp",
    "walk",
]

warnings.warn(
    "e5v.indexing moved to e5v.collection.files, passages and records (open_regular to e5v.files); import from there",
    DeprecationWarning,
    stacklevel=2,
)
