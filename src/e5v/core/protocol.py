"""``Embedder``: what every e5v embedder does, in process or over HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from e5v.core.inputs import Interleaved

__all__ = ["Embedder"]


@runtime_checkable
class Embedder(Protocol):
    """What both :class:`~e5v.core.embedder.E5VEmbedder` and :class:`~e5v.client.RemoteEmbedder` do;
    each method also takes ``batch_size`` and ``show_progress_bar`` (``None``: the default)."""

    @property
    def dimension(self) -> int: ...

    @property
    def model_name(self) -> str: ...

    @property
    def batch_size(self) -> int: ...

    def embed_texts(self, texts: Sequence[str], **options: Any) -> np.ndarray: ...

    def embed_images(self, images: Sequence[Any], **options: Any) -> np.ndarray: ...

    def embed_composed(self, images: Sequence[Any], texts: Sequence[str], **options: Any) -> np.ndarray: ...

    def embed_interleaved(self, items: Sequence[Interleaved | Sequence[Any]], **options: Any) -> np.ndarray: ...

    def embed(self, items: Sequence[Any], **options: Any) -> np.ndarray: ...
