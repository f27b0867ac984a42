"""Deprecated: the old ``e5v.store``, split into :mod:`e5v.collection.repository` (the
Chroma store) and :mod:`e5v.collection.pipeline` (indexing); this alias goes in the next
release. Import from there."""

import warnings

from e5v.collection.pipeline import IndexSummary, index_files
from e5v.collection.repository import Hit, Store, StoredRecord, StoreError

__all__ = ["Hit", "IndexSummary", "Store", "StoreError", "StoredRecord", "index_files"]

warnings.warn(
    "e5v.store moved to e5v.collection.repository and e5v.collection.pipeline; import from there",
    DeprecationWarning,
    stacklevel=2,
)
