"""Files to index, found safely: walking folders, which files are left out, and reading
only regular files.

Inside folders, hidden files and folders (a name starting with ``.``) are left out, and
files of types e5v does not index are listed as ignored. Only regular files are read:
links are followed within the folders given, FIFOs, devices, sockets, link loops,
broken links and names that are not valid UTF-8 are skipped with the reason, and a file
is opened without blocking (:func:`e5v.files.open_regular`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from e5v.files import file_type, printable_path

__all__ = [
    "IMAGE_SUFFIXES",
    "PDF_SUFFIXES",
    "SUPPORTED_SUFFIXES",
    "TEXT_SUFFIXES",
    "FileKind",
    "SkippedPath",
    "Walked",
    "file_kind",
    "sha256_bytes",
    "stamp",
    "walk",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TEXT_SUFFIXES = frozenset({".txt", ".md"})
PDF_SUFFIXES = frozenset({".pdf"})
SUPPORTED_SUFFIXES = IMAGE_SUFFIXES | TEXT_SUFFIXES | PDF_SUFFIXES

FileKind = Literal["image", "text", "pdf"]


@dataclass(frozen=True)
class SkippedPath:
    """A path that cannot be indexed, and why."""

    path: str
    reason: str


class Walked(NamedTuple):
    """What :func:`walk` found: files to index, paths that cannot be, and the files of
    other types inside folders (left out, for the summary)."""

    files: list[Path]
    skipped: list[SkippedPath]
    ignored: list[Path]


def walk(paths: Iterable[str | Path], *, follow_links: bool = False) -> Walked:
    """Files to index under ``paths`` (files and folders, recursively), sorted, each once.

    Only regular files are returned, under the path they were found at (a link keeps
    its own name; a file reached twice is listed once, by its own name if it was found
    itself). Inside folders, hidden files and folders (name starting with ``.``) are
    left out, files of other types are listed as ignored, links to folders are not
    followed, and a link to a file outside the given folders is skipped unless
    ``follow_links``. Skipped, with the reason: missing paths, link loops, broken links,
    FIFOs, devices and sockets, names that are not valid UTF-8, unreadable folders.
    A file named in ``paths`` is followed wherever its link points.
    """
    paths = [Path(given).expanduser() for given in paths]
    roots = [Path(os.path.realpath(path)) for path in paths if path.is_dir()]
    chosen: dict[Path, Path] = {}  # the file itself -> the path it is indexed under
    skipped: list[SkippedPath] = []
    ignored: list[Path] = []

    def add(found: tuple[Path, Path] | SkippedPath) -> None:
        if isinstance(found, SkippedPath):
            skipped.append(found)
            return
        path, real = found
        if chosen.setdefault(real, path) != path and path == real:
            chosen[real] = path  # the file itself, rather than a link to it

    def unreadable(exc: OSError) -> None:
        skipped.append(SkippedPath(str(exc.filename), f"cannot list this folder: {exc.strerror or exc}"))

    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path, onerror=unreadable):
                dirs[:] = sorted(name for name in dirs if not name.startswith("."))
                folder = Path(os.path.realpath(root))
                for name in sorted(files):
                    if name.startswith("."):
                        continue
                    if file_kind(Path(name)) is None:
                        ignored.append(Path(root, name))
                    else:
                        add(_regular_file(folder / name, None if follow_links else roots))
        elif not os.path.lexists(path):
            skipped.append(SkippedPath(str(path), f"no such file or folder (from {os.getcwd()!r})"))
        elif file_kind(path) is None:
            supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
            skipped.append(SkippedPath(str(path), f"unsupported file type; e5v indexes {supported}"))
        else:
            add(_regular_file(Path(os.path.realpath(path.parent), path.name), None))
    return Walked(sorted(chosen.values()), skipped, ignored)


def _regular_file(path: Path, roots: list[Path] | None) -> tuple[Path, Path] | SkippedPath:
    """``(path, the file it is)`` for a regular file or a link to one (inside ``roots``,
    unless ``None``), else why not; nothing is opened."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return SkippedPath(
            name, "the file name is not valid UTF-8; rename it (e.g. `convmv -f latin1 -t utf-8 --notest FILE`)"
        )
    try:
        info = path.lstat()
        real = path
        if stat.S_ISLNK(info.st_mode):
            real = Path(os.path.realpath(path, strict=True))
            if roots is not None and not any(real.is_relative_to(root) for root in roots):
                return SkippedPath(
                    name,
                    f"a link to {printable_path(real)!r}, outside the folders being indexed: not followed "
                    "(pass `follow_links=True` to index it, or index that file by name)",
                )
            info = real.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return SkippedPath(name, "a symlink loop; fix or remove the link")
        if exc.errno == errno.ENOENT:
            return SkippedPath(name, f"a broken link (to {printable_path(os.readlink(path))!r}); fix or remove it")
        return SkippedPath(name, f"cannot read: {exc.strerror or exc}")
    if not stat.S_ISREG(info.st_mode):
        return SkippedPath(name, f"{file_type(info.st_mode)}, not a regular file; e5v reads only regular files")
    return path, real


def stamp(info: os.stat_result) -> str:
    """Size, mtime and ctime of a file: while they are unchanged, so is its content."""
    return f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}"


def file_kind(path: Path) -> FileKind | None:
    """What a file is by its suffix (case-insensitive), or ``None`` for a type e5v does not index."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in PDF_SUFFIXES:
        return "pdf"
    return None


def sha256_bytes(data: bytes) -> str:
    """The hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()
