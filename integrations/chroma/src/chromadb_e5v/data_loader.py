"""``E5VImageLoader``: Chroma URIs to RGB image arrays, decoded as e5v decodes files."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from chromadb.api.types import URI, DataLoader, Image

from e5v.core.inputs import DEFAULT_MAX_IMAGE_PIXELS, ImageLoader

__all__ = ["E5VImageLoader"]


class E5VImageLoader(DataLoader[list[Image | None]]):
    """Loads image files (Chroma ``uris``) as HxWx3 uint8 RGB arrays.

    Unlike ``chromadb.utils.data_loaders.ImageLoader`` (``np.array(PIL.Image.open(uri))``),
    palette images get their colours rather than their palette indices, transparency is
    composited on white, 16-bit and two-channel images are converted, EXIF orientation is
    applied and oversized images are refused: the vectors equal e5v's for the same files.
    A ``None`` URI loads as ``None``; a missing or unreadable file raises
    :class:`e5v.InvalidInputError` naming its position.
    """

    def __init__(self, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        self._loader = ImageLoader(max_image_pixels=max_image_pixels)

    def __call__(self, uris: Sequence[URI | None]) -> list[Image | None]:
        return [None if uri is None else np.asarray(self._loader.load(uri, index)) for index, uri in enumerate(uris)]
