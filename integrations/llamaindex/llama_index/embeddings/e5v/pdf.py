"""``E5VPDFReader``: each page of a PDF as one LlamaIndex ``ImageDocument``, read by :mod:`e5v.pdf`."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from e5v.pdf import read_pdf
from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import ImageDocument

__all__ = ["E5VPDFReader"]

#: Metadata the reader sets; none of it is embedded with the page's text.
PAGE_KEYS = ("file_path", "file_name", "page", "total_pages")


class E5VPDFReader(BaseReader):
    """Each page of a PDF as an ``ImageDocument``: its text, its rendering and its place.

    The rendering is the one ``e5v index`` embeds (sized for E5-V's anyres grid), carried
    in the document as base64 PNG (``image``, ``image_mimetype="image/png"``): nothing is
    written to disk, and the page survives a docstore or a vector store on its own. The
    metadata is ``file_path``, ``file_name``, ``page`` (from 1) and ``total_pages``, left
    out of what is embedded, so ``E5VEmbedding.embed_image_node`` gives the same ONE
    interleaved vector as ``e5v index --pdf-records interleaved``. ``extra_info`` is added
    to every page's metadata. A page that cannot be read is left out with a warning; a
    PDF that cannot be opened raises :class:`e5v.InvalidInputError`. Needs the ``pdf``
    extra of e5v (``pip install "e5v[pdf]"``).

    Works as a ``file_extractor`` of ``SimpleDirectoryReader`` (``{".pdf": E5VPDFReader()}``)
    on local files.
    """

    def lazy_load_data(
        self, file: str | Path, extra_info: dict[str, Any] | None = None, fs: Any = None
    ) -> Iterator[ImageDocument]:
        """The pages of ``file`` one at a time, each read and rendered as it is asked for."""
        if fs is not None:
            raise ValueError("E5VPDFReader reads local files only; pass a path on this machine, without fs=")
        path = Path(file)
        for page in read_pdf(path):
            metadata = {"file_path": str(path), "file_name": path.name, "page": page.number, "total_pages": page.pages}
            yield ImageDocument(
                id_=f"{path}#page={page.number}",
                text=page.text,
                image=base64.b64encode(page.png()).decode("ascii"),
                image_mimetype="image/png",
                metadata={**(extra_info or {}), **metadata},
                excluded_embed_metadata_keys=list(PAGE_KEYS),
            )

    def load_data(
        self, file: str | Path, extra_info: dict[str, Any] | None = None, fs: Any = None
    ) -> list[ImageDocument]:
        """Every page of ``file`` (see :meth:`lazy_load_data`)."""
        return list(self.lazy_load_data(file, extra_info, fs))
