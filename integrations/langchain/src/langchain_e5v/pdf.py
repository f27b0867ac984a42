"""``E5VPDFLoader``: each page of a PDF as a LangChain ``Document``, read by :mod:`e5v.pdf`."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

from e5v.pdf import read_pdf

__all__ = ["E5VPDFLoader"]


class E5VPDFLoader(BaseLoader):
    """Each page of the PDF at ``file_path`` as a ``Document``: the page's text as
    ``page_content``; ``source``, ``page`` (from 1, as e5v counts pages) and
    ``total_pages`` in its metadata, and its rendering (the one ``e5v index`` embeds):

    - by default as ``image``, a ``data:image/png;base64,...`` URI, which
      ``E5VEmbeddings.embed_image`` takes as it is;
    - with ``image_dir``, as ``image_path``, a PNG written into that folder (created if
      needed; named after the PDF and the page), which is what ``Chroma.add_images`` reads.

    A page that cannot be read is left out with a warning; a PDF that cannot be opened
    raises :class:`e5v.InvalidInputError`. Needs the ``pdf`` extra of e5v.
    """

    def __init__(self, file_path: str | Path, *, image_dir: str | Path | None = None) -> None:
        self.file_path = Path(file_path)
        self.image_dir = None if image_dir is None else Path(image_dir)

    def lazy_load(self) -> Iterator[Document]:
        """The pages one at a time, each read and rendered as it is asked for."""
        path = self.file_path
        # one PDF's pages never overwrite another's of the same name
        tag = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:8]
        for page in read_pdf(path):
            metadata: dict[str, str | int] = {"source": str(path), "page": page.number, "total_pages": page.pages}
            if self.image_dir is None:
                metadata["image"] = "data:image/png;base64," + base64.b64encode(page.png()).decode("ascii")
            else:
                target = self.image_dir / f"{path.stem}-{tag}-page{page.number}.png"
                _write(target, page.png())
                metadata["image_path"] = str(target)
            yield Document(page_content=page.text, metadata=metadata)


def _write(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` whole or not at all (a temporary file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
