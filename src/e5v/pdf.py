"""PDFs page by page (pypdfium2, the ``pdf`` extra): each page's text, and its rendering.

A page is rendered at the size E5-V's image processor would bring it to: as large as it
fits in the best cell of E5-V's anyres grid (336-px tiles: 336x672, 672x336, 672x672,
1008x336, 336x1008, height x width), the cell LLaVA-NeXT picks for the page's shape. The
model then sees every pixel drawn, and nothing is drawn in vain (an A4 page: 476x672,
a 16:9 slide: 672x378). Page numbers count from 1, as PDF viewers show them.

The index makes records of pages (:mod:`e5v.collection.pages`); this module only reads.

PDFium is not thread-safe: every call into it here holds one lock.
"""

from __future__ import annotations

import ctypes
import io
import logging
import math
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from PIL import Image

from e5v.errors import ConfigurationError, InvalidInputError
from e5v.files import open_regular, printable_path
from e5v.optional import require

__all__ = ["E5V_GRID", "Page", "Pdf", "fit_scale", "open_pdf", "read_pdf", "render_page"]

#: E5-V's anyres pinpoints, ``(height, width)`` in pixels.
E5V_GRID: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
#: The longest side :meth:`Pdf.render` draws, whatever ``max_side`` asks.
MAX_RENDER_SIDE = 4096

logger = logging.getLogger(__name__)

_LOCK = threading.RLock()
_ERR_PASSWORD = 4  # FPDF_ERR_PASSWORD
_LINE_BREAK = re.compile(r"\r\n?")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")


def _pdfium() -> Any:
    return require("pypdfium2", "pdf")


def fit_scale(width: float, height: float, grid: Sequence[tuple[int, int]] = E5V_GRID) -> float:
    """Pixels per point that draw a ``width`` x ``height``-point page as large as it fits
    in the grid cell LLaVA-NeXT's ``select_best_resolution`` would pick for it (the one
    holding the most of its pixels, then the one wasting least)."""
    if not (width > 0 and height > 0 and math.isfinite(width * height)):
        raise InvalidInputError(f"the page measures {width}x{height} points; it has nothing to draw")
    best: tuple[int, int] | None = None
    chosen = 0.0
    for cell_height, cell_width in grid:
        scale = min(cell_width / width, cell_height / height)
        area = int(width * scale) * int(height * scale)
        rank = (area, -(cell_width * cell_height - area))
        if best is None or rank > best:
            best, chosen = rank, scale
    return chosen * (1 - 1e-7)  # PDFium rounds the bitmap's size up


class Pdf:
    """An open PDF: ``len(pdf)`` pages, each page's :meth:`text` and :meth:`render`.

    Opened by :func:`open_pdf`; close it (or use ``with``). Raises
    :class:`~e5v.errors.InvalidInputError` for an encrypted, corrupt or page-less PDF,
    and for a page that cannot be read (the others stay readable).
    """

    def __init__(self, source: str | Path | IO[bytes]) -> None:
        self._pdfium = pdfium = _pdfium()
        with _LOCK:
            _reset_last_error(pdfium)
            try:
                self._document = pdfium.PdfDocument(str(source) if isinstance(source, Path) else source)
            except pdfium.PdfiumError as exc:
                raise InvalidInputError(_open_failure(exc)) from None
            self.pages = len(self._document)
        if self.pages == 0:
            self.close()
            raise InvalidInputError("a PDF without pages; there is nothing to index")

    def __len__(self) -> int:
        return self.pages

    def __enter__(self) -> Pdf:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with _LOCK:
            self._document.close()

    def _page(self, number: int) -> Any:
        if not 1 <= number <= self.pages:
            raise InvalidInputError(f"page {number} does not exist: the PDF has pages 1 to {self.pages}")
        try:
            return self._document[number - 1]
        except self._pdfium.PdfiumError as exc:
            raise InvalidInputError(f"page {number} cannot be read ({exc})") from None

    def text(self, number: int) -> str:
        """Page ``number``'s text layer ("" without one): line breaks as ``\\n``, control
        characters dropped. Passage spans index this text."""
        with _LOCK:
            page = self._page(number)
            try:
                textpage = page.get_textpage()
                try:
                    text = textpage.get_text_range()
                finally:
                    textpage.close()
            except self._pdfium.PdfiumError as exc:
                raise InvalidInputError(f"page {number}: its text cannot be read ({exc})") from None
            finally:
                page.close()
        return _CONTROL.sub("", _LINE_BREAK.sub("\n", text))

    def render(
        self, number: int, *, max_side: int | None = None, grid: Sequence[tuple[int, int]] = E5V_GRID
    ) -> Image.Image:
        """Page ``number`` as an RGB image on white: sized for ``grid`` (see the module
        doc), or with its longer side ``max_side`` pixels (a thumbnail); never over
        :data:`MAX_RENDER_SIDE` pixels a side."""
        if max_side is not None and max_side < 1:
            raise ConfigurationError(f"max_side must be at least 1 pixel, got {max_side}")
        with _LOCK:
            page = self._page(number)
            try:
                width, height = page.get_size()
                if max_side is None:
                    scale = fit_scale(width, height, grid)
                else:
                    fit_scale(width, height)  # refuses a page without area
                    scale = min(max_side, MAX_RENDER_SIDE) / max(width, height) * (1 - 1e-7)
                bitmap = page.render(scale=scale, rev_byteorder=True, may_draw_forms=False)
                try:
                    image = bitmap.to_pil().convert("RGB")  # a copy: to_pil shares the bitmap's buffer
                finally:
                    bitmap.close()
            except InvalidInputError as exc:
                raise InvalidInputError(f"page {number}: {exc.reason}") from None
            except (self._pdfium.PdfiumError, ValueError, MemoryError) as exc:
                raise InvalidInputError(f"page {number} cannot be rendered ({type(exc).__name__}: {exc})") from None
            finally:
                page.close()
        return image


def _reset_last_error(pdfium: Any) -> None:
    """Set PDFium's last error to "format": a load that fails without setting one (a
    document without pages does) would otherwise wear the previous failure's code."""
    byte = ctypes.create_string_buffer(b"x")
    pdfium.raw.FPDF_LoadMemDocument(byte, 1, None)  # fails: FPDF_ERR_FORMAT


def _open_failure(exc: Any) -> str:
    if getattr(exc, "err_code", None) == _ERR_PASSWORD:
        return "an encrypted PDF that needs a password; e5v cannot read it: save a copy without the password"
    return (
        f"not a readable PDF ({str(exc).rstrip('.')}); check that the file is a complete, unencrypted PDF "
        "with at least one page"
    )


def open_pdf(source: str | Path | IO[bytes]) -> Pdf:
    """Open a PDF file: a path, or a binary file object PDFium reads from as it needs."""
    return Pdf(source)


@contextmanager
def _named(path: str | Path) -> Iterator[Pdf]:
    """The PDF at ``path``, open; its errors start with the path."""
    try:
        with open_regular(Path(path)) as handle, open_pdf(handle) as pdf:
            yield pdf
    except InvalidInputError as exc:
        raise InvalidInputError(f"{printable_path(path)!r}: {exc.reason}") from None


def render_page(path: str | Path, page: int, *, max_side: int | None = None) -> Image.Image:
    """Page ``page`` (from 1) of the PDF at ``path`` as an RGB image: as it is embedded,
    or with its longer side ``max_side`` pixels (for a thumbnail). Raises
    :class:`~e5v.errors.InvalidInputError` naming what is wrong, and
    :class:`~e5v.errors.MissingDependencyError` without pypdfium2."""
    with _named(path) as pdf:
        return pdf.render(page, max_side=max_side)


@dataclass(frozen=True)
class Page:
    """One page of a PDF, read: its number (from 1) of ``pages``, its text and its rendering."""

    number: int
    pages: int
    text: str
    image: Image.Image

    def png(self) -> bytes:
        """The rendering as PNG bytes (lossless: they decode to the same pixels)."""
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


def read_pdf(path: str | Path) -> Iterator[Page]:
    """Each page of the PDF at ``path``, read and rendered (as the index
    embeds it) one at a time; a page that cannot be read is left out with a warning.
    Raises :class:`~e5v.errors.InvalidInputError` for a PDF that cannot be opened."""
    with _named(path) as pdf:
        for number in range(1, len(pdf) + 1):
            try:
                page = Page(number, len(pdf), pdf.text(number), pdf.render(number))
            except InvalidInputError as exc:
                logger.warning("%s: %s; left out", printable_path(path), exc.reason)
                continue
            yield page
