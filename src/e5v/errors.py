"""The exceptions e5v raises."""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "E5VError",
    "EmbeddingError",
    "InvalidInputError",
    "MissingDependencyError",
    "ModelLoadError",
]


class E5VError(Exception):
    """Base class of every error raised by e5v."""


class InvalidInputError(E5VError, ValueError):
    """An input item cannot be embedded; the message names its index and the fix."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message if index is None else f"item {index}: {message}")
        self.index = index
        self.reason = message

    def shifted(self, offset: int) -> InvalidInputError:
        """The same error for an item ``offset`` places further on in a longer list."""
        return InvalidInputError(self.reason, index=None if self.index is None else self.index + offset)


class ConfigurationError(E5VError, ValueError):
    """An option has a value e5v cannot use (a device, a dtype, a size); the message lists valid ones."""


class MissingDependencyError(E5VError, ImportError):
    """An optional feature's package is not installed; the message says what to install."""


class ModelLoadError(E5VError):
    """A checkpoint or processor cannot be loaded, or is not a LLaVA-NeXT model e5v can use."""


class EmbeddingError(E5VError, RuntimeError):
    """The model failed while embedding (out of memory at batch size 1, non-finite output)."""
