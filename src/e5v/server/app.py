"""The ASGI app of ``e5v serve``: HTTP in front of one :class:`~e5v.server.scheduler.Scheduler`.

Routes: ``POST /v1/embeddings`` (OpenAI's shape, multimodal items), ``GET /v1/models``,
``GET /health`` (alive), ``GET /ready`` (503 while the model loads), ``GET /info``,
``GET /metrics`` (Prometheus). ``/v1/*`` needs ``Authorization: Bearer KEY`` when keys
are set. Once the server listens, the model loads on a thread that then runs every round.
With a collection (``ServerConfig.store``), also the search endpoints and the page of
:mod:`e5v.server.search`. Every answer carries an ``x-request-id``, and those of
``/v1/embeddings`` and ``/v1/search`` text-embeddings-inference's timing headers
(:mod:`e5v.server.http`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from e5v.core.embedder import E5VEmbedder
from e5v.core.prompts import PRESETS
from e5v.errors import (
    ConfigurationError,
    InvalidInputError,
    RequestError,
)
from e5v.model.identity import model_identity
from e5v.server.errors import LastResort, error_response, job_answers
from e5v.server.http import AccessLog, CloseOn408, HostCheck, RequestHeaders, timing
from e5v.server.metrics import Metrics
from e5v.server.openapi import PROMETHEUS, add_docs, build_openapi
from e5v.server.scheduler import (
    DEFAULT_MAX_REQUEST_PIXELS,
    Embedded,
    RoundStats,
    Scheduler,
)
from e5v.wire.schema import embedding_request, parse_json, quoted

if TYPE_CHECKING:
    from e5v.collection.repository import Store

__all__ = ["ServerConfig", "create_app"]

logger = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """What ``e5v serve`` serves, and its limits."""

    model_name: str
    load: Callable[[], E5VEmbedder]
    api_keys: list[str] = field(default_factory=list)
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 256
    payload_limit: int = 16 * 1024 * 1024
    max_queued_items: int = 4096
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    allow_remote_images: bool = False
    batching: bool = True
    store: Store | None = None  # with a collection: the search endpoints and the page at /
    body_timeout: float = 30.0  # seconds for a request's body to arrive; after: 408, connection closed
    allowed_hosts: list[str] | None = None  # the Host names answered (any port); None: any (see e5v.server.http)
    cors_origins: list[str] = field(default_factory=list)  # origins allowed cross-origin; none: CORS off
    access_log: bool = False  # one log line a request (e5v.server.http.AccessLog)

    def __post_init__(self) -> None:
        if any(not key.strip() for key in self.api_keys):
            raise ConfigurationError("an API key is empty or whitespace; give real keys, or none for an open server")


class _TimedScheduler(Scheduler):
    """The server's scheduler: each job's queue and model times and tokens are added to the
    :class:`~e5v.server.http.Timing` of the request that submitted it, for its headers."""

    def submit(self, requests: list[Any], bodies: dict[str, str]) -> Future[Embedded]:
        future = super().submit(requests, bodies)
        timed = timing()
        if timed is not None:

            def note(done: Future[Embedded]) -> None:
                if not done.cancelled() and done.exception() is None:
                    result = done.result()
                    timed.add(result.queue_seconds, result.inference_seconds, int(sum(result.tokens)))

            future.add_done_callback(note)  # before the route's own: it runs first
        return future


class _State:
    """The loaded embedder and its scheduler (``None`` while loading), a load failure, and
    whether the scheduler is serving rounds."""

    def __init__(self) -> None:
        self.embedder: E5VEmbedder | None = None
        self.scheduler: Scheduler | None = None
        self.failure: str | None = None
        self.serving = False  # the scheduler runs rounds (until the app stops, or its thread dies)
        self.model_id: str | None = None  # the loaded model's identity (e5v.model.identity)
        self.in_flight = 0
        self.started = int(time.time())


def create_app(config: ServerConfig) -> FastAPI:
    state = _State()
    metrics = Metrics()

    def record(stats: RoundStats) -> None:
        metrics.round_items.observe(stats.items)
        metrics.round_requests.observe(stats.jobs)
        metrics.round_seconds.observe(stats.seconds)

    def load() -> None:
        started = time.perf_counter()
        try:
            embedder = config.load()
        except Exception as exc:
            state.failure = f"{type(exc).__name__}: {exc}"
            logger.error("the model failed to load: %s", state.failure)
            return
        scheduler = _TimedScheduler(
            embedder,
            batching=config.batching,
            max_queued_items=config.max_queued_items,
            max_request_pixels=config.max_request_pixels,
            on_round=record,
            thread=False,
        )
        state.model_id = model_identity(embedder.model_name)
        state.serving = True
        state.scheduler, state.embedder = scheduler, embedder
        logger.info(
            "ready: %s, %d-d, on %s in %s, loaded in %.1f s",
            config.model_name,
            embedder.dimension,
            embedder.device,
            str(embedder.dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        try:
            scheduler.serve()  # on the thread that loaded the model
        finally:
            state.serving = False

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="e5v-model", daemon=True).start()
        yield
        if state.scheduler is not None:
            await asyncio.to_thread(state.scheduler.close)

    app = FastAPI(
        title="e5v",
        summary="E5-V universal multimodal embeddings, OpenAI-compatible",
        lifespan=lifespan,
        docs_url=None,  # add_docs: Swagger UI served from the package, not a CDN
        redoc_url=None,
    )
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(CloseOn408)
    if config.allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=config.allowed_hosts)  # outermost: a foreign Host reaches nothing

    @app.exception_handler(RequestError)
    async def refused(_request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, exc.message, param=exc.param, kind=exc.kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers.setdefault("Allow", "GET, HEAD")  # the static files' 405, the one that names no methods
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = next(iter(exc.errors()), {})
        where = ".".join(str(part) for part in first.get("loc", ())) or "the request"
        return error_response(400, f"{quoted(where)}: {first.get('msg', 'invalid')}")

    def embedder_or_503() -> tuple[E5VEmbedder, Scheduler]:
        if state.failure is not None:
            raise RequestError(500, f"the model failed to load: {state.failure}", kind="server_error")
        if state.embedder is None or state.scheduler is None:
            raise RequestError(503, "the model is still loading; retry shortly", kind="server_error")
        return state.embedder, state.scheduler

    def authorize(request: Request) -> None:
        if not config.api_keys:
            return
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        given = given.strip()
        matched = False
        for key in config.api_keys:  # every key compared, in constant time
            matched |= hmac.compare_digest(given.encode(), key.encode())
        if not scheme or (scheme.lower() == "bearer" and not given):
            message = "no API key was sent, and this server needs one; send the header Authorization: Bearer KEY"
        elif scheme.lower() != "bearer":
            message = f"the Authorization header must be Bearer KEY, not {quoted(scheme)} ...; send Bearer KEY"
        elif not matched:
            message = "the API key sent is not one of this server's keys; check it (Authorization: Bearer KEY)"
        else:
            return
        raise RequestError(401, message, kind="authentication_error")

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once the model is loaded, 503 before and once its scheduler stops")
    async def ready() -> JSONResponse:
        if state.failure is not None:
            return JSONResponse({"status": "failed", "error": state.failure}, status_code=500)
        if state.embedder is None:
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "1"})
        if not state.serving:
            return JSONResponse({"status": "stopped", "error": "the model's scheduler has stopped"}, status_code=503)
        return JSONResponse({"status": "ready"})

    app.state.ready = ready  # the probe as a call, for hosts that check readiness without HTTP (e5v.ray.serve)

    @app.get("/info", summary="The model and the server's limits")
    async def info() -> dict[str, Any]:
        embedder = state.embedder
        return {
            "model": config.model_name,
            "ready": embedder is not None,
            "model_id": state.model_id,
            "revision": None if embedder is None else embedder.revision,
            "dtype": None if embedder is None else str(embedder.dtype).removeprefix("torch."),
            "device": None if embedder is None else str(embedder.device),
            "dimension": None if embedder is None else embedder.dimension,
            "max_batch_tokens": None if embedder is None else embedder.max_batch_tokens,
            "max_batch_size": None if embedder is None else embedder.batch_size,
            "max_concurrent_requests": config.max_concurrent_requests,
            "max_client_batch_size": config.max_client_batch_size,
            "payload_limit": config.payload_limit,
            "max_queued_items": config.max_queued_items,
            "max_request_pixels": config.max_request_pixels,
            "allow_remote_images": config.allow_remote_images,
            "cross_request_batching": config.batching,
            "prompt_presets": sorted(PRESETS),
        }

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text exposition format 0.0.4)",
        response_class=Response,
        responses={200: {"content": {PROMETHEUS: {"schema": {"type": "string"}}}}},
    )
    async def prometheus() -> Response:
        if state.scheduler is not None:
            metrics.queue_items.set(state.scheduler.queued_items)
        return Response(metrics.render(), media_type=PROMETHEUS)

    @app.get("/v1/models", summary="The served model (OpenAI's shape)")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": state.started, "owned_by": "e5v"}],
        }

    @app.post(
        "/v1/embeddings",
        summary="Embed texts, images, interleaved and composed items: one vector each",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}},
            }
        },
    )
    async def embeddings(request: Request) -> Response:
        started = time.perf_counter()
        status = 200
        try:
            return await embed(request)
        except RequestError as exc:
            status = exc.status
            raise
        finally:
            metrics.requests.labels(str(status)).inc()
            metrics.latency.observe(time.perf_counter() - started)

    def take_slot() -> None:
        """Take one of the ``max_concurrent_requests`` slots, or answer 429 when none is free."""
        if state.in_flight >= config.max_concurrent_requests:
            raise RequestError(
                429,
                f"the server is serving its limit of {config.max_concurrent_requests} concurrent requests; retry "
                "shortly",
                kind="rate_limit_error",
            )
        state.in_flight += 1
        metrics.in_flight.inc()

    def free_slot() -> None:
        state.in_flight -= 1
        metrics.in_flight.dec()

    @contextmanager
    def slot() -> Iterator[None]:
        """Hold a slot for the block (a request whose body has arrived, while it is embedded)."""
        take_slot()
        try:
            yield
        finally:
            free_slot()

    async def embed(request: Request) -> Response:
        authorize(request)
        body = await _read_json(request, config.payload_limit, config.body_timeout)
        take_slot()  # once the body is in: a slow or stalled body holds no slot
        try:
            embedder, scheduler = embedder_or_503()
            requests, bodies, encoding = _checked(body, config, embedder)
            with job_answers("input"):
                future = scheduler.submit(requests, bodies)
                result = await _wait(asyncio.wrap_future(future), future, request)
            if result is None:
                return Response(status_code=499)  # the client has gone: nothing to send
            for item in requests:
                metrics.items.labels(item.kind).inc()
            metrics.tokens.inc(sum(result.tokens))
            return _response(result, encoding, config.model_name)
        finally:
            free_slot()

    if config.store is not None:
        from e5v.server.search import add_search

        add_search(
            app,
            config.store,
            authorize=authorize,
            ready=embedder_or_503,
            loaded=lambda: state.embedder is not None,
            read_json=partial(_read_json, timeout=config.body_timeout),
            slot=slot,
            payload_limit=config.payload_limit,
            metrics=metrics,
        )

    add_docs(app)
    app.openapi = lambda: build_openapi(app, keyed=bool(config.api_keys))  # type: ignore[method-assign]
    app.add_middleware(LastResort)  # outside every route and check, so nothing escapes it
    app.add_middleware(RequestHeaders)  # outside LastResort, which only adds headers: its 500s get an id too
    if config.access_log:
        app.add_middleware(AccessLog)  # the outermost: every answer, with its status and id
    return app


async def _read_json(request: Request, limit: int, timeout: float) -> dict[str, Any]:
    """The body as a JSON object, read no further than ``limit`` bytes (413 beyond) and
    within ``timeout`` seconds (408 after; the connection is then closed)."""
    too_large = RequestError(413, f"the request body is over the server's payload limit of {limit} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise RequestError(
            408,
            f"the request body did not arrive within the server's body timeout of {timeout:g} s; send it at once "
            "(or start the server with a longer --body-timeout)",
        ) from None
    return parse_json(raw)  # a 400 if it is not a JSON object, or nested too deep


def _checked(
    body: dict[str, Any], config: ServerConfig, embedder: E5VEmbedder
) -> tuple[list[Any], dict[str, str], str]:
    """The body's requests, prompt bodies and encoding, or the :class:`RequestError` to answer:
    the schema parses the body; what it cannot know is checked here (the item limit, a 413
    before any item is parsed; the served model's name, a 404)."""
    items = body.get("input")
    if isinstance(items, list) and len(items) > config.max_client_batch_size:
        raise RequestError(
            413,
            f"{len(items)} items is over the server's limit of {config.max_client_batch_size} a request; "
            "split the input",
            param="input",
        )
    request = embedding_request(body, dimension=embedder.dimension)
    if request.model is not None and request.model != config.model_name:
        raise RequestError(
            404,
            f"model {quoted(request.model)} is not served here; this server serves {config.model_name!r}",
            param="model",
        )
    try:
        requests = request.requests(allow_remote=config.allow_remote_images)
    except InvalidInputError as exc:
        raise RequestError(400, str(exc), param="input") from None
    return requests, embedder.prompt_bodies(request.prompts), request.encoding_format


async def _wait(waiting: asyncio.Future[Embedded], future: Any, request: Request) -> Embedded | None:
    """The job's result; ``None`` (and the job dropped) if the client disconnects first.

    The body has been read, so the next ASGI message is the disconnect: waiting for it
    costs nothing while the job runs (no polling)."""
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiting, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        future.cancel()
        raise
    finally:
        watcher.cancel()
    if not waiting.done():
        future.cancel()
        waiting.cancel()
        return None
    return waiting.result()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _response(result: Embedded, encoding: str, model: str) -> Response:
    vectors = np.ascontiguousarray(result.vectors, dtype="<f4")
    if encoding == "base64":
        data = [base64.b64encode(vector.tobytes()).decode("ascii") for vector in vectors]
    else:
        data = vectors.tolist()
    tokens = int(sum(result.tokens))
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": embedding} for i, embedding in enumerate(data)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")
