"""The exceptions of training."""

from __future__ import annotations

from e5v.errors import E5VError

__all__ = ["TrainingDataError", "TrainingError"]


class TrainingError(E5VError):
    """Training cannot start or continue (missing package, checkpoint that does not match)."""


class TrainingDataError(TrainingError, ValueError):
    """A training or evaluation file cannot be used; the message names the file, row and column."""
