"""Chroma embedding function for E5-V: documents and images in one space.

Importing this package registers :class:`E5VEmbeddingFunction` with Chroma under the
name ``"e5v"``, so collections created with it reopen without passing it again.
"""

from __future__ import annotations

from chromadb_e5v.data_loader import E5VImageLoader
from chromadb_e5v.embedding_function import E5VEmbeddingFunction, clear_cache

__all__ = ["E5VEmbeddingFunction", "E5VImageLoader", "clear_cache"]
