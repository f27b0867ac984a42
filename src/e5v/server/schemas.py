"""The JSON of ``POST /v1/embeddings``: its documented shape, and its items as checked requests.

``input`` is a string or a list of items, one vector per item, in order:

- a string, or ``{"type": "text", "text": ...}``: a text;
- ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``: an image
  (OpenAI's content part; ``http(s)`` URLs only when the server allows remote images);
- a list of such text and image parts: ONE interleaved item, parts in order;
- ``{"type": "composed", "image_url": {...}, "text": ...}``: a composed query, the image
  changed as the text says.

A request never names a file of the server: an image is inline data or, if allowed, a URL.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from e5v.errors import InvalidInputError
from e5v.inputs import (
    Interleaved,
    Request,
    composed_request,
    decode_data_uri,
    image_request,
    interleaved_request,
    text_request,
)

__all__ = [
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorResponse",
    "RequestError",
    "Usage",
    "parse_items",
]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(description="data:image/...;base64,... (or http(s) when the server allows remote images)")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ComposedItem(BaseModel):
    type: Literal["composed"]
    image_url: ImageURL
    text: str = Field(description="how to change the image (E5-V's composed-retrieval prompt)")


Item = str | TextPart | ImagePart | ComposedItem | list[TextPart | ImagePart]


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, with multimodal items (the schema is for the docs;
    :func:`parse_items` checks a body and names the item that is wrong)."""

    input: str | list[Item] = Field(description="one item, or a list of items: one vector each, in order")
    model: str | None = Field(default=None, description="the served model's name (optional)")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: the little-endian float32 bytes of each vector"
    )
    dimensions: int | None = Field(default=None, description="refused: E5-V vectors are not truncatable")
    user: str | None = None
    prompts: str | None = Field(default=None, description="a prompt preset of e5v.prompts.PRESETS, e.g. 'cirr'")


class EmbeddingData(BaseModel):
    """One vector: its item's position in ``input``, as floats or base64 little-endian float32."""

    object: Literal["embedding"] = "embedding"
    index: int = Field(ge=0)
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingResponse(BaseModel):
    """OpenAI's embeddings response: one ``data`` row per item."""

    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, for every 4xx and 5xx."""

    error: ErrorBody


class RequestError(Exception):
    """A request the server refuses: an HTTP status, OpenAI's error type, the parameter, the message."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def parse_items(value: object, *, allow_remote: bool) -> list[Request]:
    """``input`` as checked requests, or :class:`InvalidInputError` naming the item."""
    if isinstance(value, str):
        return [text_request(value, 0)]
    if not isinstance(value, list) or not value:
        raise InvalidInputError("input must be a string or a non-empty list of items")
    return [_request(item, index, allow_remote) for index, item in enumerate(value)]


def _request(item: object, index: int, allow_remote: bool) -> Request:
    if isinstance(item, str):
        return text_request(item, index)
    if isinstance(item, list):
        if not item:
            raise InvalidInputError("an interleaved item needs at least one part", index=index)
        if all(isinstance(part, int) and not isinstance(part, bool) for part in item):
            raise InvalidInputError("token ids are not accepted; send the text itself", index=index)
        return interleaved_request(Interleaved([_part(part, index, allow_remote) for part in item]), index)
    if not isinstance(item, dict):
        raise InvalidInputError(
            f"an item must be a string, a content part or a list of parts, got {type(item).__name__}", index=index
        )
    kind = item.get("type")
    if kind == "text":
        return text_request(_text(item, index), index)
    if kind == "image_url":
        return image_request(_image(item, index, allow_remote), index)
    if kind == "composed":
        return composed_request(_image(item, index, allow_remote), _text(item, index), index)
    raise InvalidInputError(f"unknown item type {kind!r}; use 'text', 'image_url' or 'composed'", index=index)


def _part(part: object, index: int, allow_remote: bool) -> object:
    """A part of an interleaved item: a ``str`` is its text, ``bytes`` or a URL an image."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return _text(part, index)  # type: ignore[arg-type]
    if kind == "image_url":
        return _image(part, index, allow_remote)  # type: ignore[arg-type]
    raise InvalidInputError(
        "an interleaved item's parts must be {'type': 'text'} or {'type': 'image_url'}", index=index
    )


def _text(item: dict[str, Any], index: int) -> str:
    text = item.get("text")
    if not isinstance(text, str):
        raise InvalidInputError(f"'text' must be a string, got {type(text).__name__}", index=index)
    return text


def _image(item: dict[str, Any], index: int, allow_remote: bool) -> object:
    """The image's bytes (a data URI) or its URL (remote images allowed)."""
    image_url = item.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise InvalidInputError("'image_url' must be {'url': 'data:image/...;base64,...'}", index=index)
    if url[:5].lower() == "data:":
        return decode_data_uri(url, index)
    if url[:8].lower().startswith(("http://", "https://")):
        if not allow_remote:
            raise InvalidInputError(
                "remote image URLs are refused by this server; send the image inline as a data: URI "
                "(or start the server with --allow-remote-images)",
                index=index,
            )
        return url
    raise InvalidInputError(
        "an image must be a data:image/...;base64, URI (or an http(s) URL where the server allows it); "
        "the server never reads its own files",
        index=index,
    )
