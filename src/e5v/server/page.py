"""The search page of ``e5v serve --db``: static files shipped in the package, at ``/``.

The page holds no data: it asks the ``/v1`` endpoints (with the key the user types, kept
for the tab's session) for everything it shows. Its Content-Security-Policy allows
scripts, styles, requests and images from this server only (and the ``blob:`` images
the page makes of thumbnails and uploads): no inline script, nothing from elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

__all__ = ["CONTENT_SECURITY_POLICY", "add_page"]

STATIC = Path(__file__).with_name("static")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class _Static(StaticFiles):
    """The page's files, with the page's headers."""

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


def add_page(app: FastAPI) -> None:
    """Serve the page at ``/`` and its scripts and styles under ``/static/``."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=HEADERS)

    app.mount("/static", _Static(directory=STATIC), name="static")
