"""A persistent, content-addressed embedding cache shared safely by processes.

One small file per vector under ``DIR/<2 hex>/<key>.vec``: a header (magic, dimension,
a BLAKE2b digest of the payload) then the float32 payload. Writes go to a temporary
file in the same folder and are published with :func:`os.replace`, so readers see a
whole entry or none, and concurrent writers of the same key simply race to an equal
result. An entry that is truncated, corrupt, of the wrong dimension, non-finite or
not unit-length is never returned: it counts as a miss and is rewritten.

Keys (:func:`entry_key`) hash everything a vector depends on: the model identity
(id or path, revision, dtype, adapter, options that change outputs), the full prompt
and the content of each image: the bytes of a file (read, not decoded), of encoded
bytes, or the pixels of a PIL image or array.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from e5v.core.inputs import update_digest
from e5v.errors import ConfigurationError

__all__ = ["EmbeddingCache", "entry_key", "image_digest", "path_fingerprint"]

logger = logging.getLogger(__name__)

_MAGIC = b"E5VC\x01"
_HEADER = struct.Struct("<5sI16s")  # magic+version, dimension, payload digest
_UNIT_TOLERANCE = 1e-3


class EmbeddingCache:
    """Vectors on disk by key; ``hits`` and ``misses`` count lookups of this object."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create the embedding cache folder {str(self.directory)!r}: {exc}"
            ) from exc
        self.hits = 0
        self.misses = 0
        self._count_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r})"

    def path_of(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.vec"

    def get(self, key: str, dimension: int) -> np.ndarray | None:
        """The stored vector, or ``None`` if absent or unusable (logged, then rewritten on put)."""
        path = self.path_of(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return self._count(None)
        except OSError as exc:
            logger.warning("embedding cache entry %s unreadable (%s); recomputing", path, exc)
            return self._count(None)
        vector = _decode(data, dimension)
        if vector is None:
            logger.warning("embedding cache entry %s is corrupt or truncated; recomputing", path)
        return self._count(vector)

    def put(self, key: str, vector: np.ndarray) -> None:
        """Store ``vector`` atomically (a failure to write is logged, never raised)."""
        payload = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        header = _HEADER.pack(_MAGIC, len(payload) // 4, hashlib.blake2b(payload, digest_size=16).digest())
        path = self.path_of(key)
        try:
            path.parent.mkdir(exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".vec")
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(header + payload)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            logger.warning("cannot write embedding cache entry %s: %s", path, exc)

    def _count(self, vector: np.ndarray | None) -> np.ndarray | None:
        with self._count_lock:
            if vector is None:
                self.misses += 1
            else:
                self.hits += 1
        return vector


def _decode(data: bytes, dimension: int) -> np.ndarray | None:
    if len(data) != _HEADER.size + 4 * dimension:
        return None
    magic, stored_dimension, digest = _HEADER.unpack_from(data)
    payload = data[_HEADER.size :]
    if magic != _MAGIC or stored_dimension != dimension:
        return None
    if hashlib.blake2b(payload, digest_size=16).digest() != digest:
        return None
    vector = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all() or abs(float(np.linalg.norm(vector)) - 1.0) > _UNIT_TOLERANCE:
        return None
    return vector


def entry_key(identity: str, prompt: str, images: Iterable[bytes]) -> str:
    """The hex key of one input: model ``identity``, full ``prompt``, image digests in order."""
    digest = hashlib.blake2b(digest_size=20)
    for part in (identity.encode(), prompt.encode("utf-8"), *images):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def image_digest(obj: object) -> bytes | None:
    """A digest of an image-like's content, or ``None`` when it cannot be cached (a remote
    URL, whose content may change; a missing file, which the loader reports)."""
    digest = hashlib.blake2b(digest_size=20)
    if isinstance(obj, str) and obj[:5].lower() == "data:":
        digest.update(b"uri" + obj.encode())
    elif isinstance(obj, str) and "://" in obj[:16]:
        return None
    elif isinstance(obj, (str, Path)):
        try:
            with open(obj, "rb") as stream:
                for block in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(block)
        except (OSError, ValueError):
            return None
    elif not update_digest(digest, obj):
        return None
    return digest.digest()


def path_fingerprint(path: str | Path) -> str:
    """Sizes and modification times of a local model folder's weight files ("" for a hub id),
    so a checkpoint rewritten in place gets new keys."""
    folder = Path(path)
    if not folder.is_dir():
        return ""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
