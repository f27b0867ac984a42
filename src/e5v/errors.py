"""The exceptions e5v raises."""

from __future__ import annotations

__all__ = ["E5VError", "InvalidInputError", "ModelLoadError", "EmbeddingError"]


class E5VError(Exception):
    """Base class of every error raised by e5v."""


class InvalidInputError(E5VError, ValueError):
    """An input item cannot be embedded; the message names its index and the fix."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message if index is None else f"item {index}: {message}")
        self.index = index


class ModelLoadError(E5VError):
    """A checkpoint or processor cannot be loaded, or is not a LLaVA-NeXT model e5v can use."""


class EmbeddingError(E5VError, RuntimeError):
    """The model failed while embedding (out of memory at batch size 1, non-finite output)."""
