"""Pictures of records: thumbnails (downscaled JPEGs made on first request and kept in
memory) and the larger pictures search results carry for RAG (:func:`picture`).

A picture is made only from the bytes that were indexed: the record's file must still
be a regular file whose sha256 is the record's. Thumbnails are kept, least recently used
dropped first, up to a byte budget, and remade when the file's size, mtime or ctime change.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from e5v.collection.files import sha256_bytes
from e5v.collection.files import stamp as file_stamp
from e5v.collection.repository import StoredRecord
from e5v.core.inputs import DEFAULT_MAX_IMAGE_PIXELS, ImageLoader
from e5v.errors import InvalidInputError, MissingDependencyError, ThumbnailError
from e5v.files import open_regular, printable_path
from e5v.pdf import open_pdf

__all__ = ["CONTENT_SIDE", "Picture", "Thumbnails", "has_thumbnail", "picture"]

logger = logging.getLogger(__name__)

#: The longest side of a thumbnail, in pixels (sharp at twice a 200-pixel card).
THUMBNAIL_SIZE = 400
#: JPEG quality of thumbnails.
JPEG_QUALITY = 85
#: Bytes of thumbnails kept in memory.
CACHE_BYTES = 64 * 1024 * 1024
#: The longest side of a result's picture for RAG (``content``), in pixels.
CONTENT_SIDE = 1024


def has_thumbnail(record: StoredRecord) -> bool:
    """An image file's record, or any record of a PDF page (the page rendered)."""
    return record.metadata.get("kind") == "image" or record.page is not None


@dataclass(frozen=True)
class Picture:
    """An encoded picture: its ``media_type`` (``image/png`` or ``image/jpeg``), size and bytes."""

    media_type: str
    width: int
    height: int
    data: bytes


def picture(record: StoredRecord, max_side: int = CONTENT_SIDE, loader: ImageLoader | None = None) -> Picture:
    """The record's picture at most ``max_side`` pixels a side: a PDF page rendered, as
    PNG; an image file, as JPEG. Raises :class:`ThumbnailError` saying why there is none."""
    image = _drawn(record, max_side, loader or ImageLoader())
    buffer = io.BytesIO()
    if record.page is None:
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG", optimize=True)
    media_type = "image/jpeg" if record.page is None else "image/png"
    return Picture(media_type, image.width, image.height, buffer.getvalue())


def _drawn(record: StoredRecord, size: int, loader: ImageLoader) -> Image.Image:
    """The record's picture, at most ``size`` pixels a side, from the bytes that were indexed."""
    id_, path, page = record.id, str(record.metadata.get("path")), record.page
    if not has_thumbnail(record):
        raise ThumbnailError(
            f"record {id_!r} is a {record.metadata.get('kind')} record; only image records and PDF pages have pictures"
        )
    shown = printable_path(path)
    if not os.path.lexists(path):
        raise ThumbnailError(
            f"the file of record {id_!r} ({shown}) is gone; run `e5v index --prune` to drop its records"
        )
    try:
        with open_regular(Path(path)) as handle:
            data = handle.read(os.fstat(handle.fileno()).st_size)
    except InvalidInputError as exc:
        raise ThumbnailError(f"cannot read the file of record {id_!r} ({shown}): {exc.reason}") from None
    except OSError as exc:
        raise ThumbnailError(f"cannot read the file of record {id_!r} ({shown}): {exc.strerror or exc}") from None
    if sha256_bytes(data) != record.metadata.get("sha256"):
        raise ThumbnailError(
            f"the file of record {id_!r} ({shown}) has changed since it was indexed; run `e5v index` again"
        )
    try:
        if page is None:
            image = loader.load(data, 0)
        else:
            with open_pdf(io.BytesIO(data)) as pdf:  # the bytes checked, not the file again
                image = pdf.render(page, max_side=size)
    except InvalidInputError as exc:
        what = "image" if page is None else f"PDF page {page}"
        raise ThumbnailError(f"the file of record {id_!r} ({shown}) is not a readable {what}: {exc.reason}") from None
    except MissingDependencyError as exc:
        raise ThumbnailError(f"the PDF page of record {id_!r} cannot be drawn here: {exc}") from None
    image.thumbnail((size, size))
    return image


class Thumbnails:
    """JPEG thumbnails of image records, made once per file version; ``on_generate`` is
    called each time one is made, ``on_hit`` each time one is served from memory."""

    def __init__(
        self,
        *,
        size: int = THUMBNAIL_SIZE,
        max_bytes: int = CACHE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        on_generate: Callable[[], None] = lambda: None,
        on_hit: Callable[[], None] = lambda: None,
    ) -> None:
        self.size, self.max_bytes = size, max_bytes
        self._loader = ImageLoader(max_image_pixels=max_image_pixels)
        self._on_generate, self._on_hit = on_generate, on_hit
        self._kept: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._kept_bytes = 0
        self._lock = threading.Lock()
        self._making: dict[tuple[str, str, str], threading.Lock] = {}

    def get(self, record: StoredRecord) -> bytes:
        """The record's thumbnail (JPEG bytes), or :class:`ThumbnailError` saying why there is none."""
        path = str(record.metadata.get("path"))
        if not has_thumbnail(record):
            _drawn(record, self.size, self._loader)  # says why
        try:
            info = os.stat(path)
        except OSError:
            raise ThumbnailError(
                f"the file of record {record.id!r} ({printable_path(path)}) is gone; run `e5v index --prune` to "
                "drop its records"
            ) from None
        key = (record.id, str(record.metadata.get("sha256")), file_stamp(info))
        with self._lock:
            making = self._making.setdefault(key, threading.Lock())
        with making:  # one request makes a thumbnail; the others wait for it
            with self._lock:
                kept = self._kept.get(key)
                if kept is not None:
                    self._kept.move_to_end(key)
            if kept is not None:
                self._on_hit()
                return kept
            try:
                thumbnail = self._make(record)
                self._keep(key, thumbnail)
            finally:
                with self._lock:
                    self._making.pop(key, None)
        return thumbnail

    def _make(self, record: StoredRecord) -> bytes:
        image = _drawn(record, self.size, self._loader)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        self._on_generate()
        logger.debug("made a %dx%d thumbnail of %s", *image.size, printable_path(str(record.metadata.get("path"))))
        return buffer.getvalue()

    def _keep(self, key: tuple[str, str, str], thumbnail: bytes) -> None:
        with self._lock:
            if key in self._kept:
                return
            self._kept[key] = thumbnail
            self._kept_bytes += len(thumbnail)
            while self._kept_bytes > self.max_bytes and len(self._kept) > 1:
                _, dropped = self._kept.popitem(last=False)
                self._kept_bytes -= len(dropped)
