"""The JSON of ``POST /v1/embeddings``: its documented shape, which parses a body into checked requests.

``input`` is a string or a list of items, one vector per item, in order:

- a string, or ``{"type": "text", "text": ...}``: a text;
- ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``: an image
  (OpenAI's content part; ``http(s)`` URLs only when the server allows remote images);
- a list of such text and image parts: ONE interleaved item, parts in order;
- ``{"type": "composed", "image_url": {...}, "text": ...}``: a composed query, the image
  changed as the text says.

Texts are never empty (OpenAI refuses ``""`` too). A request never names a file of the
server: an image is inline data or, if allowed, a URL. :func:`embedding_request` parses a
body; :func:`refusal` turns any model's :class:`~pydantic.ValidationError` into the 400 to
answer, naming the item (``item 3: ...``) or the field; :func:`quoted` is how every error
message quotes an input, cut short.
"""

from __future__ import annotations

import reprlib
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from e5v.core.inputs import (
    Interleaved,
    Request,
    composed_request,
    decode_data_uri,
    image_request,
    interleaved_request,
    text_request,
)
from e5v.core.prompts import PRESETS
from e5v.errors import InvalidInputError, RequestError

__all__ = [
    "MAX_JSON_DEPTH",
    "QUOTE_LIMIT",
    "ComposedItem",
    "EmbeddingData",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "ErrorBody",
    "ErrorResponse",
    "ImagePart",
    "ImageURL",
    "TextPart",
    "Usage",
    "embedding_request",
    "parse_json",
    "quoted",
    "refusal",
]

#: The most characters of an input an error message quotes.
QUOTE_LIMIT = 100
#: The deepest nesting of arrays and objects a body may have (the JSON parser's bound; a valid body has 5).
MAX_JSON_DEPTH = 200
_ITEM_TYPES = ("text", "image_url", "composed")
#: The error type of a field the schema refuses whatever its value (its message says why).
_UNSUPPORTED = "unsupported"

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, QUOTE_LIMIT, QUOTE_LIMIT, QUOTE_LIMIT
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 4


def quoted(value: object) -> str:
    """``repr(value)`` cut to :data:`QUOTE_LIMIT` characters: how an error message shows an input."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int too long for repr
        text = f"a {type(value).__name__}"
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def parse_json(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or the 400 to answer (malformed, nested deeper than
    :data:`MAX_JSON_DEPTH`, a lone surrogate, not an object)."""
    try:
        body = pydantic_core.from_json(raw)
    except ValueError as exc:
        reason = f"nested deeper than {MAX_JSON_DEPTH} levels" if "recursion limit" in str(exc) else str(exc)
        raise RequestError(400, f"the request body is not valid JSON ({reason})") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    return body


class _Strict(BaseModel):
    """A part of a request: JSON types exactly (no ``"5"`` for 5), no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)


NonEmptyText = Annotated[str, Field(min_length=1)]


class ImageURL(_Strict):
    url: str = Field(description="data:image/...;base64,... (or http(s) when the server allows remote images)")

    def image(self, index: int, *, allow_remote: bool) -> bytes | str:
        """The image's bytes (a data URI) or its URL (remote images allowed), else :class:`InvalidInputError`."""
        url = self.url
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
            f"image_url.url {quoted(url)} is not a data:image/...;base64, URI (nor an http(s) URL where the server "
            "allows them); the server never reads its own files",
            index=index,
        )


class TextPart(_Strict):
    type: Literal["text"]
    text: NonEmptyText


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class ComposedItem(_Strict):
    type: Literal["composed"]
    image_url: ImageURL
    text: NonEmptyText = Field(description="how to change the image (E5-V's composed-retrieval prompt)")


def _tag(value: Any) -> str | None:
    """Which kind of item or part ``value`` is, for the discriminated unions below."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "parts"
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if isinstance(kind, str) else None


Part = Annotated[Annotated[TextPart, Tag("text")] | Annotated[ImagePart, Tag("image_url")], Discriminator(_tag)]
Item = Annotated[
    Annotated[NonEmptyText, Tag("string")]
    | Annotated[TextPart, Tag("text")]
    | Annotated[ImagePart, Tag("image_url")]
    | Annotated[ComposedItem, Tag("composed")]
    | Annotated[list[Part], Field(min_length=1), Tag("parts")],
    Discriminator(_tag),
]
Input = Annotated[
    Annotated[NonEmptyText, Tag("string")] | Annotated[list[Item], Field(min_length=1), Tag("parts")],
    Discriminator(_tag),
]
Preset = Literal[tuple(sorted(PRESETS))]  # type: ignore[valid-type]


class EmbeddingRequest(_Strict):
    """OpenAI's embeddings request, with multimodal items; :meth:`requests` gives its checked items."""

    input: Input = Field(description="one item, or a list of items: one vector each, in order")
    model: str | None = Field(default=None, description="the served model's name (optional)")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="base64: the little-endian float32 bytes of each vector"
    )
    dimensions: None = Field(default=None, description="refused: E5-V vectors are not truncatable")
    user: str | None = None
    prompts: Preset | None = Field(default=None, description="a prompt preset of e5v.core.prompts.PRESETS")

    @field_validator("dimensions", mode="before")
    @classmethod
    def _no_dimensions(cls, value: object, info: ValidationInfo) -> None:
        """Any ``dimensions`` but null, refused saying why (the validation context's
        ``dimension``, if given, is the size the model gives)."""
        if value is None:
            return None
        dimension = (info.context or {}).get("dimension")
        raise PydanticCustomError(
            _UNSUPPORTED,
            "dimensions is not supported: E5-V gives {size} and is not trained for shorter ones; leave dimensions out",
            {"size": f"{dimension}-d vectors" if dimension else "vectors of one size"},
        )

    def requests(self, *, allow_remote: bool) -> list[Request]:
        """The items as the core's requests, or :class:`InvalidInputError` naming the item
        (a data URI that is not base64, a remote URL this server refuses, ``<image>`` in a text)."""
        items = [self.input] if isinstance(self.input, str) else self.input
        return [_request(item, index, allow_remote) for index, item in enumerate(items)]


def _request(
    item: str | TextPart | ImagePart | ComposedItem | list[TextPart | ImagePart], index: int, allow_remote: bool
) -> Request:
    if isinstance(item, str):
        return text_request(item, index)
    if isinstance(item, TextPart):
        return text_request(item.text, index)
    if isinstance(item, ImagePart):
        return image_request(item.image_url.image(index, allow_remote=allow_remote), index)
    if isinstance(item, ComposedItem):
        return composed_request(item.image_url.image(index, allow_remote=allow_remote), item.text, index)
    parts = [
        part.text if isinstance(part, TextPart) else part.image_url.image(index, allow_remote=allow_remote)
        for part in item
    ]
    return interleaved_request(Interleaved(parts), index)


def embedding_request(body: dict[str, Any], *, dimension: int | None = None) -> EmbeddingRequest:
    """``body`` as an :class:`EmbeddingRequest`, or the 400 (:func:`refusal`) to answer;
    ``dimension`` (the served model's) is named when ``dimensions`` is refused."""
    try:
        return EmbeddingRequest.model_validate(body, context={"dimension": dimension})
    except ValidationError as exc:
        raise refusal(exc, "the request") from None


def refusal(exc: ValidationError, what: str) -> RequestError:
    """The 400 for a body that ``what`` (``"the request"``, ``"the search request"``) refused:
    a field refused whatever its value, else every unknown field, else the first error, naming
    its item (``item 3: ...``) or field."""
    errors = exc.errors(include_url=False)
    for error in errors:
        if error["type"] == _UNSUPPORTED:
            return RequestError(400, error["msg"], param=str(error["loc"][0]))
    unknown = [
        str(error["loc"][0]) for error in errors if error["type"] == "extra_forbidden" and len(error["loc"]) == 1
    ]
    if unknown:
        names = ", ".join(quoted(name) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        return RequestError(400, f"unknown fields [{names}{more}]; see /docs for {what}'s shape", param=unknown[0][:80])
    error = errors[0]
    loc = error["loc"]
    field = str(loc[0]) if loc else None
    if field == "input" and len(loc) > 2 and isinstance(loc[2], int):
        return RequestError(400, f"item {loc[2]}: {_item_message(error, _path(loc[3:]))}", param="input")
    return RequestError(400, _message(error, what, field, what), param=None if field is None else field[:80])


def _path(loc: tuple[int | str, ...]) -> list[int | str]:
    """An item's error location without the union tags (each follows an index, and the item's comes first)."""
    path: list[int | str] = []
    tag = True
    for part in loc:
        if not tag:
            path.append(part)
        tag = isinstance(part, int)
    return path


def _item_message(error: Any, path: list[int | str]) -> str:
    """What is wrong in an item, at ``path`` within it (``[part index,] field names``)."""
    kind, value = error["type"], error["input"]
    part = next((f"part {index}: " for index in path if isinstance(index, int)), "")
    names = [str(name) for name in path if not isinstance(name, int)]
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        token = isinstance(value, int) and not isinstance(value, bool)
        if token and part:  # a list of token ids
            return "token ids are not accepted; send the text itself"
        if token:
            return f"an item must be a string, a content part or a list of parts, got {quoted(value)} (no token ids)"
        if part:
            return (
                f"{part}an interleaved item's parts must be {{'type': 'text', ...}} or {{'type': 'image_url', ...}}, "
                f"got {_described(value)}"
            )
        if isinstance(value, dict):
            return f"unknown item type {quoted(value.get('type'))}; use 'text', 'image_url' or 'composed'"
        return f"an item must be a string, a content part or a list of parts, got {_json_type(value)}"
    if kind == "too_short" and not path:
        return "an interleaved item needs at least one part"
    return _message(error, part.removesuffix(": ") or "the item", ".".join(names) or None, "the request")


def _message(error: Any, owner: str, field: str | None, shape: str) -> str:
    """A field's error: ``owner`` holds the field (``the request``, ``part 2``), whose dotted
    name is ``field``; ``shape`` is what /docs shows."""
    kind, value, context = error["type"], error["input"], error.get("ctx") or {}
    prefix = f"{owner}: " if owner.startswith("part ") else ""
    name = quoted(field.rpartition(".")[2]) if field else "a value"
    if kind == "missing":
        return f"{owner} has no {name}"
    if kind == "extra_forbidden":
        return f"{prefix}unknown field {name}; see /docs for {shape}'s shape"
    if kind == "string_too_short" and context.get("min_length") == 1:
        return f"{prefix}{field or 'the text'} is empty; send at least one character (as with OpenAI's API)"
    if field == "input" and kind in ("union_tag_not_found", "union_tag_invalid", "too_short"):
        return f"input must be a string or a non-empty list of items, got {_described(value)}"
    if kind == "literal_error":
        return f"{prefix}{field} must be {context.get('expected')}, got {quoted(value)}"
    if kind == "model_type" and field and field.endswith("image_url"):
        return f"{prefix}{field} must be {{'url': 'data:image/...;base64,...'}}, got {_described(value)}"
    return f"{prefix}{field or 'the body'}: {error['msg']}, got {_described(value)}"


def _described(value: object) -> str:
    """A JSON value for an error message: scalars quoted, containers by their JSON type."""
    if isinstance(value, list) and not value:
        return "an empty list"
    if isinstance(value, (dict, list)):
        return _json_type(value)
    return quoted(value)


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


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
