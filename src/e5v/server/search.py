"""The search endpoints of ``e5v serve --db``, over the collection it serves.

``POST /v1/search``: a text, an image, both (a composed query: the image changed as the
text says), or a record's stored vector ("more like this", nothing embedded) → ranked
hits, filtered (``where``) and grouped by PDF page or file (``group``, see
:mod:`e5v.collection.query`), each with its picture for RAG when ``content`` is asked.
``GET /v1/records/{id}/thumbnail``: a JPEG of an image record or a PDF page, made on first
request and kept. ``GET /v1/records/{id}/file``: the file a record was indexed from (a PDF
whole: open it at ``#page=N``), while it is still the indexed one (same sha256).
``GET /v1/collection``: the model, record count and kinds. Files are reached only through
record ids of the collection, never by a path. Like every
``/v1/*`` route they need the server's key when it has keys; the page at ``/``
(:mod:`e5v.server.page`) holds no data and is served to everyone.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import mimetypes
import os
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from e5v.collection.files import sha256_bytes
from e5v.collection.query import KindMatch, Result, default_group, where_from
from e5v.collection.query import search as search_store
from e5v.collection.repository import Hit, Store, StoredRecord
from e5v.core.embedder import E5VEmbedder
from e5v.core.inputs import Request as Item
from e5v.core.inputs import check_text, decode_data_uri, query_item, to_request
from e5v.errors import (
    ConfigurationError,
    E5VError,
    InvalidInputError,
    RequestError,
    ThumbnailError,
)
from e5v.files import open_regular, printable_path
from e5v.server.errors import job_answers
from e5v.server.metrics import Metrics
from e5v.server.page import add_page
from e5v.server.scheduler import Scheduler
from e5v.server.thumbnails import CONTENT_SIDE, Thumbnails, has_thumbnail, picture
from e5v.wire.schema import quoted, refusal

__all__ = ["CollectionInfo", "SearchHit", "SearchRequest", "SearchResponse", "add_search"]

logger = logging.getLogger(__name__)

#: The most results a search returns.
MAX_K = 200
#: The largest side a result's picture (``content``) may be asked at, in pixels.
MAX_CONTENT_SIDE = 2048
#: The largest file ``GET /v1/records/{id}/file`` serves, in bytes.
MAX_FILE_BYTES = 512 * 1024 * 1024
#: Media types of the files an index reads, by suffix (images by :mod:`mimetypes`).
MEDIA_TYPES = {".pdf": "application/pdf", ".txt": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8"}

T = TypeVar("T")


class SearchRequest(BaseModel):
    """A query: ``text``, ``image``, both (composed), or ``like`` alone."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(
        default=None, description="the query text; with image, how to change the image (a composed query)"
    )
    image: str | None = Field(default=None, description="the query image: base64 bytes or a data:image/...;base64, URI")
    like: str | None = Field(
        default=None, description="a record id: search by its stored vector, nothing embedded (not with text or image)"
    )
    k: int = Field(default=10, ge=1, le=MAX_K, description="how many results")
    kind: str | None = Field(default=None, description="only records of this kind: 'image', 'text', ...")
    where: list[str] | dict[str, str | int | float | bool] | None = Field(
        default=None,
        description="filters, all of which must hold: a list of 'KEY=VALUE', 'KEY!=VALUE', 'page=2..5', "
        "'path~TEXT', 'path^=/abs/prefix', 'text~WORDS', or an object of keys and the values they must equal",
    )
    group: Literal["page", "file", "none"] | None = Field(
        default=None,
        description="one hit per PDF page (or other file), per file, or per record; by default 'page' when the "
        "collection holds PDF pages, else 'none'",
    )
    content: bool = Field(default=False, description="give each image or PDF page hit its picture (base64)")
    content_size: int = Field(
        default=CONTENT_SIDE, ge=64, le=MAX_CONTENT_SIDE, description="the picture's longest side, in pixels"
    )


class Content(BaseModel):
    """A hit's picture for a multimodal LLM: a PDF page rendered (PNG) or an image file (JPEG)."""

    media_type: Literal["image/png", "image/jpeg"]
    width: int
    height: int
    data: str = Field(description="the picture's bytes, base64")


class SearchHit(Hit):
    """One result (:class:`~e5v.collection.repository.Hit`), with the URLs of its thumbnail
    (an image or a PDF page) and file; a PDF page's number is in ``metadata``, with the
    record's other public fields. A grouped hit adds ``kinds`` (its best record of each
    kind: id, cosine score, rank) and ``pages`` (its PDF's page count); its ``score`` is
    their reciprocal-rank fusion."""

    page: int | None = Field(default=None, exclude=True)
    kinds: dict[str, KindMatch] | None = Field(default=None, description="a grouped hit's best record of each kind")
    pages: int | None = Field(default=None, description="a grouped PDF page's page count")
    thumbnail: str | None = Field(default=None, description="GET this (with the key) for the image's thumbnail")
    file: str = Field(description="GET this (with the key) for the file the record was indexed from")
    content: Content | None = Field(default=None, description="with content: true, the image or page's picture")


class SearchResponse(BaseModel):
    query: Literal["text", "image", "composed", "like"] = Field(description="what was searched with")
    group: Literal["page", "file", "none"] = Field(description="how the hits are grouped")
    hits: list[SearchHit]


class CollectionInfo(BaseModel):
    name: str
    model: str = Field(description="the model the records were embedded with")
    revision: str | None = None
    records: int
    kinds: dict[str, int] = Field(description="records of each kind")
    ready: bool = Field(description="whether the model is loaded (text and image queries wait for it)")


def add_search(
    app: FastAPI,
    store: Store,
    *,
    authorize: Callable[[Request], None],
    ready: Callable[[], tuple[E5VEmbedder, Scheduler]],
    loaded: Callable[[], bool],
    read_json: Callable[[Request, int], Awaitable[dict[str, Any]]],
    slot: Callable[[], AbstractContextManager[None]],
    payload_limit: int,
    metrics: Metrics,
) -> None:
    """Add the search endpoints over ``store`` and the page to ``app``, reusing its key
    check (``authorize``), model (``ready``: the embedder and scheduler, else a 503),
    body reader, concurrency slots (``slot``: held while a query is embedded, else a 429)
    and metrics."""
    registry = metrics.registry
    searches = Counter("e5v_search_requests", "Search requests answered, by HTTP status", ["status"], registry=registry)
    generated = Counter("e5v_thumbnails_generated", "Thumbnails made from image files", registry=registry)
    kept = Counter("e5v_thumbnails_cache_hits", "Thumbnails served from memory", registry=registry)
    thumbnails = Thumbnails(on_generate=generated.inc, on_hit=kept.inc)
    store_lock = threading.Lock()  # one reader of the Chroma client at a time
    model = None if store.binding is None else store.binding.model
    revision = None if store.binding is None else store.binding.revision

    async def stored(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def locked() -> T:
            with store_lock:
                return call(*args, **kwargs)

        try:
            return await asyncio.to_thread(locked)
        except E5VError as exc:
            raise RequestError(500, str(exc), kind="server_error") from None

    async def record(id_: str) -> StoredRecord:
        found = await stored(store.get_records, [id_], vectors=True)
        if not found:
            raise RequestError(404, f"no record {quoted(id_)} in collection {store.name!r}", param="id")
        return found[0]

    @app.get("/v1/collection", summary="The served collection: its model, record count and kinds")
    async def collection(request: Request) -> CollectionInfo:
        authorize(request)
        count = await stored(store.count)
        kinds = await stored(store.kinds)
        return CollectionInfo(
            name=store.name, model=str(model), revision=revision, records=count, kinds=kinds, ready=loaded()
        )

    @app.post(
        "/v1/search",
        summary="Search the collection by text, image, both (composed), or a record's stored vector",
        response_model=SearchResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SearchRequest.model_json_schema()}},
            }
        },
    )
    async def search(request: Request) -> SearchResponse:
        status = 200
        try:
            return await answer(request)
        except RequestError as exc:
            status = exc.status
            raise
        finally:
            searches.labels(str(status)).inc()

    async def answer(request: Request) -> SearchResponse:
        authorize(request)
        query = _parsed(await read_json(request, payload_limit))
        try:
            where = where_from(query.where)
        except ConfigurationError as exc:
            raise RequestError(400, str(exc), param="where") from None
        exclude: tuple[str, ...] = ()
        if query.like is not None:
            vector = (await record(query.like)).vector
            assert vector is not None  # asked for
            what: Literal["text", "image", "composed", "like"] = "like"
            exclude = (query.like,)
        else:
            embedder, scheduler = ready()
            item = _item(query)
            what = item.kind  # type: ignore[assignment]
            with slot():
                vector = await _embed(item, embedder, scheduler, metrics)
        group = query.group or await stored(default_group, store)
        found = await stored(
            search_store, store, vector, k=query.k, kind=query.kind, where=where, group=group, exclude=exclude
        )
        shown = [_hit(rank, result) for rank, result in enumerate(found, 1)]
        if query.content:
            shown = await asyncio.to_thread(_with_content, shown, found, query.content_size)
        return SearchResponse(query=what, group=group, hits=shown)

    @app.get(
        "/v1/records/{record_id}/thumbnail",
        summary="A JPEG thumbnail of an image record (made on first request, then kept)",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def thumbnail(record_id: str, request: Request) -> Response:
        authorize(request)
        found = await record(record_id)
        try:
            image = await asyncio.to_thread(thumbnails.get, found)
        except ThumbnailError as exc:
            raise RequestError(404, str(exc), param="id") from None
        headers = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}
        return Response(image, media_type="image/jpeg", headers=headers)

    @app.get(
        "/v1/records/{record_id}/file",
        summary="The file a record was indexed from, while it is unchanged (a PDF whole: open it at #page=N)",
        response_class=Response,
        responses={
            200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            409: {"description": "the file has changed since it was indexed"},
        },
    )
    async def file(record_id: str, request: Request) -> Response:
        authorize(request)
        found = await record(record_id)
        data, media_type, name = await asyncio.to_thread(_indexed_file, found)
        headers = {
            "Cache-Control": "private, no-cache",
            "X-Content-Type-Options": "nosniff",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(name, safe='')}",
        }
        return Response(data, media_type=media_type, headers=headers)

    add_page(app)


def _indexed_file(record: StoredRecord) -> tuple[bytes, str, str]:
    """The bytes, media type and name of a record's file, read only while it is a regular
    file holding the bytes that were indexed (a 404 if gone or unreadable, a 409 if changed)."""
    path = Path(str(record.metadata.get("path")))
    shown = printable_path(path)
    if not os.path.lexists(path):
        message = f"the file of record {record.id!r} ({shown}) is gone; run `e5v index --prune` to drop its records"
        raise RequestError(404, message, param="id")
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise RequestError(
                    413, f"the file of record {record.id!r} ({shown}) is over {MAX_FILE_BYTES} bytes", param="id"
                )
            data = handle.read(size)
    except InvalidInputError as exc:
        message = f"cannot read the file of record {record.id!r} ({shown}): {exc.reason}"
        raise RequestError(404, message, param="id") from None
    except OSError as exc:
        message = f"cannot read the file of record {record.id!r} ({shown}): {exc.strerror or exc}"
        raise RequestError(404, message, param="id") from None
    if sha256_bytes(data) != record.metadata.get("sha256"):
        message = f"the file of record {record.id!r} ({shown}) has changed since it was indexed; run `e5v index` again"
        raise RequestError(409, message, param="id")
    suffix = path.suffix.lower()
    media_type = MEDIA_TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return data, media_type, path.name


def _parsed(body: dict[str, Any]) -> SearchRequest:
    """The body as a :class:`SearchRequest`, or a 400 naming the field that is wrong."""
    try:
        query = SearchRequest.model_validate(body)
    except ValidationError as exc:
        raise refusal(exc, "the search request") from None
    text = query.text if query.text is not None and query.text.strip() else None
    if query.like is not None:
        if text is not None or query.image is not None:
            raise RequestError(400, "like searches by a stored record alone; leave out text and image", param="like")
        return query
    if text is None and query.image is None:
        raise RequestError(400, "the query is empty: give a text, an image, both, or like (a record id)", param="text")
    return query.model_copy(update={"text": text})


def _item(query: SearchRequest) -> Item:
    """The query as one request to embed (its image is decoded once, when it is prepared)."""
    try:
        text = None if query.text is None else check_text(query.text, 0)
    except InvalidInputError as exc:
        raise RequestError(400, f"text: {exc.reason}", param="text") from None
    try:
        image = None if query.image is None else _image_bytes(query.image)
    except InvalidInputError as exc:
        raise RequestError(400, f"image: {exc.reason}", param="image") from None
    return to_request(query_item(text, image), 0)


def _image_bytes(value: str) -> bytes:
    """The bytes of a base64 image, plain or as a data URI."""
    if value[:5].lower() == "data:":
        return decode_data_uri(value, 0)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(
            f"it is not base64 ({exc}); send the file's bytes base64-encoded, or as a data:image/...;base64, URI"
        ) from None


async def _embed(item: Item, embedder: E5VEmbedder, scheduler: Scheduler, metrics: Metrics) -> np.ndarray:
    """The query's vector, embedded by the server's scheduler with the collection's prompts."""
    field = "image" if item.images else "text"

    def invalid(exc: InvalidInputError) -> tuple[str, str]:
        return f"{field}: {exc.reason}", field

    with job_answers("image", invalid=invalid, too_large=_too_many_pixels(scheduler)):
        result = await asyncio.wrap_future(scheduler.submit([item], embedder.prompt_bodies()))
    metrics.items.labels(item.kind).inc()
    metrics.tokens.inc(sum(result.tokens))
    return result.vectors[0]


def _too_many_pixels(scheduler: Scheduler) -> str:
    return (
        f"image: it holds more pixels than the server's limit of {scheduler.max_request_pixels} a request; downscale it"
    )


def _hit(rank: int, result: Result | StoredRecord) -> SearchHit:
    """The hit of a result (or of a record, ranked by itself)."""
    if isinstance(result, StoredRecord):
        result = Result(result, float(result.score or 0.0))
    hit = result.hit(rank)
    url = f"/v1/records/{quote(result.record.id, safe='')}"
    thumbnail = f"{url}/thumbnail" if has_thumbnail(result.record) else None
    return SearchHit(**hit.model_dump(), thumbnail=thumbnail, file=f"{url}/file")


def _with_content(hits: list[SearchHit], found: list[Result], side: int) -> list[SearchHit]:
    """The hits, each image or PDF page one with its picture (none where it cannot be drawn)."""
    shown = []
    for hit, result in zip(hits, found):
        content = None
        if has_thumbnail(result.record):
            try:
                drawn = picture(result.record, side)
                fields = {"media_type": drawn.media_type, "width": drawn.width, "height": drawn.height}
                content = Content.model_validate({**fields, "data": base64.b64encode(drawn.data).decode("ascii")})
            except ThumbnailError as exc:
                logger.warning("no picture for hit %d: %s", hit.rank, exc)
        shown.append(hit.model_copy(update={"content": content}))
    return shown
