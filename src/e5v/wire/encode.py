"""Core inputs as ``POST /v1/embeddings`` items: the client's side of :mod:`e5v.wire.schema`.

Each function turns what an ``E5VEmbedder.embed_*`` method takes into JSON items the
schema's :class:`~e5v.wire.schema.EmbeddingRequest` parses back into the same core
requests: texts as strings, images as their encoded bytes in ``data:`` URIs (files are
read here, PIL images and arrays are encoded as PNG; ``http(s)`` URLs go as they are),
composed and interleaved items as their content parts. Each item carries the pixels its
images' headers claim, so :func:`chunks` can cut a list into requests within a server's
``max_request_pixels`` as the server counts them. Errors name the item by its index.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from e5v.core.inputs import Composed, ImageLoader, Interleaved, as_list, check_lengths, decode_data_uri, describe
from e5v.errors import InvalidInputError

__all__ = ["WireItem", "chunks", "composed_items", "image_items", "interleaved_items", "mixed_items", "text_items"]


@dataclass(frozen=True)
class WireItem:
    """One item as the server's JSON, and the pixels its images' headers claim (0 where none tell)."""

    json: Any
    pixels: int = 0


#: Reads image headers for their size, as the server's scheduler does (never decodes pixels).
_HEADERS = ImageLoader()


def chunks(items: Sequence[WireItem], most: int, max_pixels: int | None) -> list[range]:
    """``items`` cut, in order, into runs of at most ``most`` items and ``max_pixels`` pixels (``None``: any),
    each closed before it would go over; an item over ``max_pixels`` alone is an :class:`InvalidInputError`."""
    runs: list[range] = []
    start = pixels = 0
    for index, item in enumerate(items):
        if max_pixels is not None and item.pixels > max_pixels:
            raise InvalidInputError(
                f"its images hold {item.pixels} pixels, over the server's limit of {max_pixels} a request "
                "(max_request_pixels in its /info); downscale them, or restart the server with a larger "
                "--max-request-pixels",
                index=index,
            )
        if index - start == most or (max_pixels is not None and pixels + item.pixels > max_pixels):
            runs.append(range(start, index))
            start, pixels = index, 0
        pixels += item.pixels
    if start < len(items):
        runs.append(range(start, len(items)))
    return runs


def text_items(texts: Sequence[str]) -> list[WireItem]:
    """Texts (``embed_texts``) as items."""
    return [WireItem(_text(text, i)) for i, text in enumerate(as_list(texts, "texts"))]


def image_items(images: Sequence[Any]) -> list[WireItem]:
    """Image-likes (``embed_images``) as items; a ``str`` is a path, a ``data:`` URI or an ``http(s)`` URL."""
    return [WireItem(*_image_part(image, i)) for i, image in enumerate(as_list(images, "images"))]


def composed_items(images: Sequence[Any], texts: Sequence[str]) -> list[WireItem]:
    """Composed queries (``embed_composed``) as items."""
    images, texts = as_list(images, "images"), as_list(texts, "texts")
    check_lengths(images, texts)
    return [_item(Composed(image, text), i) for i, (image, text) in enumerate(zip(images, texts))]


def interleaved_items(items: Sequence[Interleaved | Sequence[Any]]) -> list[WireItem]:
    """Interleaved items (``embed_interleaved``: ``Interleaved`` or sequences of parts) as items."""
    return [
        _item(item if isinstance(item, Interleaved) else Interleaved(item), i)
        for i, item in enumerate(as_list(items, "items"))
    ]


def mixed_items(items: Sequence[Any]) -> list[WireItem]:
    """A mixed list (``embed``) as items."""
    return [_item(item, i) for i, item in enumerate(as_list(items, "items"))]


def _text(value: object, index: int) -> str:
    if not isinstance(value, str):
        raise InvalidInputError(f"texts must be strings, got {describe(value)}", index=index)
    return value


def _item(item: object, index: int) -> WireItem:
    """One item as the server's JSON: a ``str`` is text, anything else as ``E5VEmbedder.embed`` reads it."""
    if isinstance(item, str):
        return WireItem(item)
    if isinstance(item, Composed):
        part, pixels = _image_part(item.image, index)
        return WireItem({"type": "composed", "image_url": part["image_url"], "text": item.text}, pixels)
    if isinstance(item, Interleaved):
        parts = [
            ({"type": "text", "text": part}, 0) if isinstance(part, str) else _image_part(part, index)
            for part in item.parts
        ]
        return WireItem([part for part, _ in parts], sum(pixels for _, pixels in parts))
    return WireItem(*_image_part(item, index))


def _image_part(image: object, index: int) -> tuple[dict[str, Any], int]:
    """An image-like as a content part (a URL as it is, anything else as its encoded bytes), and its pixels."""
    if isinstance(image, str) and image[:8].lower().startswith(("http://", "https://")):
        return {"type": "image_url", "image_url": {"url": image}}, 0
    if isinstance(image, str) and image[:5].lower() == "data:":
        try:
            pixels = _pixels(decode_data_uri(image, index))
        except InvalidInputError:  # the server says what is wrong with it
            pixels = 0
        return {"type": "image_url", "image_url": {"url": image}}, pixels
    data = _encoded(image, index)
    return {"type": "image_url", "image_url": {"url": _data_uri(data)}}, _pixels(data)


def _pixels(data: bytes) -> int:
    """The pixels an encoded image's header claims (0 where it cannot be read: the server says why)."""
    size = _HEADERS.peek_size(data)
    return 0 if size is None else size[0] * size[1]


def _encoded(image: object, index: int) -> bytes:
    if isinstance(image, (str, Path)):
        try:
            return Path(image).read_bytes()
        except OSError as exc:
            raise InvalidInputError(
                f"image file {str(image)!r} cannot be read ({exc.strerror or exc}); check the path", index=index
            ) from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, np.ndarray):
        image = ImageLoader(max_image_pixels=image.size + 1).load(image, index)  # checked, as the embedder would
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if hasattr(image, "read") and callable(image.read):
        data = image.read()
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
    raise InvalidInputError(f"unsupported image type {describe(image)}; pass a path, bytes or a PIL image", index=index)


def _data_uri(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as opened:
            kind = (opened.format or "png").lower()
    except Exception:  # the server says what is wrong with it
        kind = "png"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"
