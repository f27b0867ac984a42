"""The OpenAPI schema of ``e5v serve``, true to what it answers, and Swagger UI at ``/docs``.

:func:`build_openapi` documents every route's request and response bodies, and each 4xx
and 5xx it can answer in the error shape (:class:`~e5v.wire.schema.ErrorResponse`),
with ``Retry-After`` on 429 and 503, ``x-request-id`` on every answer and the timing
headers on those of ``/v1/embeddings`` and ``/v1/search``. :func:`add_docs` serves Swagger UI 5 (the first to
read OpenAPI 3.1, which FastAPI writes) from the ``fastapi-swagger`` package's files, so
``/docs`` works offline, under a Content-Security-Policy that allows nothing from elsewhere
and no inline script.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from e5v.server.http import REQUEST_ID_CHARS, TIMED_PATHS, TIMING_HEADERS
from e5v.wire.schema import EmbeddingRequest, EmbeddingResponse, ErrorResponse

__all__ = ["DOCS_CONTENT_SECURITY_POLICY", "PROMETHEUS", "Readiness", "add_docs", "build_openapi"]

#: The media type of ``/metrics``: Prometheus' text exposition format.
PROMETHEUS = "text/plain; version=0.0.4"
#: Swagger UI's page: its own scripts and styles only (its stylesheet draws icons from ``data:`` images).
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_DOCS_HEADERS = {
    "Content-Security-Policy": DOCS_CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_DOCS = Path(__file__).with_name("docs")
_SWAGGER_UI = Path(str(files("fastapi_swagger.resources")))  # swagger-ui-bundle.js, swagger-ui.css
_REF = "#/components/schemas/{model}"


class Readiness(BaseModel):
    """``/ready``: ``ready`` (200), ``loading`` (503) or ``failed`` with the load's error (500)."""

    status: Literal["ready", "loading", "failed"]
    error: str | None = None


_MEANINGS = {
    400: "Malformed or invalid request: the message names the item or field",
    401: "Missing or wrong API key",
    404: "Not found: the message says what",
    408: "The request body did not arrive within the server's body timeout (the connection is closed)",
    413: "Over a limit: payload bytes, items a request, or pixels a request",
    421: "The Host header is not a name of this server (a loopback server without keys)",
    429: "Over the concurrency or queue limit; retry after Retry-After seconds",
    500: "The server failed (the model did not load, or an unexpected error, which is logged)",
    503: "The model is still loading; retry after Retry-After seconds",
}
_EVERY = (421, 500)
_BODY = (400, 408, 413)
#: The errors of each operation, besides those of every one (:data:`_EVERY`).
_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/embeddings"): (*_BODY, 401, 404, 429, 503),
    ("get", "/v1/models"): (401,),
    ("post", "/v1/search"): (*_BODY, 401, 404, 429, 503),
    ("get", "/v1/collection"): (401,),
    ("get", "/v1/records/{record_id}/thumbnail"): (401, 404),
    ("get", "/v1/records/{record_id}/file"): (401, 404),
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
_REQUEST_ID = {
    "x-request-id": {
        "description": f"the request's own x-request-id (characters other than letters, digits and ._:/+=@- "
        f"dropped, cut to {REQUEST_ID_CHARS}), else a new id",
        "schema": {"type": "string"},
    }
}
_TIMING = {
    name: {
        "description": meaning + ("" if name == "x-total-time" else "; only when something was embedded"),
        "schema": {"type": "integer"},
    }
    for name, meaning in TIMING_HEADERS.items()
}


def build_openapi(app: FastAPI, *, keyed: bool) -> dict[str, Any]:
    """``app``'s OpenAPI schema, made once: FastAPI's, with the request and error models and
    every error each operation answers (FastAPI's 422 is gone: a bad request is a 400);
    ``keyed``: the server has API keys, which ``/v1/*`` then needs (and may answer 401)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version="1", summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        models.pop(unused, None)
    _, defined = models_json_schema(
        [(EmbeddingRequest, "validation"), (EmbeddingResponse, "serialization"), (ErrorResponse, "serialization")],
        ref_template=_REF,
    )
    models.update(defined["$defs"])
    models["Readiness"] = Readiness.model_json_schema(ref_template=_REF)
    if keyed:
        components["securitySchemes"] = {"key": {"type": "http", "scheme": "bearer", "description": "an API key"}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            _document(path, method, operation, keyed)
    app.openapi_schema = schema
    return schema


def _document(path: str, method: str, operation: dict[str, Any], keyed: bool) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    if path == "/v1/embeddings":
        responses["200"] = _json(200, "One vector per item, in order", "EmbeddingResponse")
    if path == "/ready":
        responses["200"] = _json(200, "Ready", "Readiness")
        responses["503"] = {**_json(503, "Loading", "Readiness"), "headers": dict(_RETRY_AFTER)}
        responses["500"] = {
            "description": "The model failed to load (Readiness), or an unexpected error (the error shape)",
            "content": {"application/json": {"schema": {"anyOf": [_ref("Readiness"), _ref("ErrorResponse")]}}},
        }
    if keyed and path.startswith("/v1/"):
        operation["security"] = [{"key": []}]
    for status in (*_ERRORS.get((method, path), ()), *_EVERY):
        if (status != 401 or keyed) and str(status) not in responses:
            responses[str(status)] = _json(status, _MEANINGS[status], "ErrorResponse")
            if status in (429, 503):
                responses[str(status)]["headers"] = dict(_RETRY_AFTER)
    for status, response in responses.items():
        headers = response.setdefault("headers", {})
        headers.update(_REQUEST_ID)
        if path in TIMED_PATHS and status == "200":
            headers.update(_TIMING)


def _json(status: int, description: str, model: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _ref(model: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=model)}


class _Files(StaticFiles):
    """Swagger UI's files, with the page's headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_DOCS_HEADERS)
        return response


def add_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs``, of ``/openapi.json``: the page and its starter script from
    this package, Swagger UI's own files from ``fastapi-swagger`` under ``/docs/ui/``."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(_DOCS / "index.html", headers=_DOCS_HEADERS)

    @app.get("/docs/start.js", include_in_schema=False)
    async def start() -> FileResponse:
        return FileResponse(_DOCS / "start.js", media_type="text/javascript", headers=_DOCS_HEADERS)

    app.mount("/docs/ui", _Files(directory=_SWAGGER_UI), name="swagger-ui")
