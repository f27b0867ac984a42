"""Files read safely: only regular files, opened without blocking, and paths shown as one line.

Used by everything that opens a file a user named or a collection holds (the index, the
PDF reader, the thumbnails), so that a FIFO, device or socket put in a file's place is
refused instead of hanging the reader.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

from e5v.errors import InvalidInputError

__all__ = ["file_type", "open_regular", "printable_path"]


def file_type(mode: int) -> str:
    """What a file of ``mode`` is, in words ("a FIFO", "a folder", ...)."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "a special file"


def printable_path(path: str | Path) -> str:
    """A path as one line of text: odd bytes and line breaks escaped as ``\\xe9``, ``\\n``."""
    text = str(path)
    return text if text.isprintable() else repr(text)[1:-1]


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading, without blocking (a FIFO put in a file's place cannot
    hang the open); :class:`~e5v.errors.InvalidInputError` unless it is a regular file
    that can be read."""
    try:
        handle = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except OSError as exc:
        raise InvalidInputError(f"cannot read: {exc.strerror or exc}") from None
    mode = os.fstat(handle.fileno()).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        raise InvalidInputError(f"{file_type(mode)}, not a regular file; e5v reads only regular files")
    return handle
