"""The exceptions e5v raises: one tree, every class under :class:`E5VError`.

::

    E5VError
    ├── InvalidInputError (ValueError)      an item cannot be embedded
    ├── ConfigurationError (ValueError)     an option or config has a value e5v cannot use
    │   └── DatasetUnavailableError         an evaluation dataset is neither local nor reachable
    ├── MissingDependencyError (ImportError) an optional package is not installed
    ├── ModelLoadError                      a checkpoint cannot be loaded
    ├── EmbeddingError (RuntimeError)       the model failed while embedding
    ├── StoreError                          a collection cannot be used as asked
    ├── ThumbnailError                      a record has no thumbnail to give
    ├── QueueFullError                      the server's queue is full
    ├── RequestTooLargeError                one request asks for more than it may
    ├── RequestError                        the server refuses an HTTP request
    └── TrainingError                       training cannot start or continue
        └── TrainingDataError (ValueError)  a training or evaluation file cannot be used

Messages name the parameter or item that failed and how to fix it, in the library's terms
(parameters, not command-line flags; the CLI names its flags when it prints them).
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DatasetUnavailableError",
    "E5VError",
    "EmbeddingError",
    "InvalidInputError",
    "MissingDependencyError",
    "ModelLoadError",
    "QueueFullError",
    "RequestError",
    "RequestTooLargeError",
    "StoreError",
    "ThumbnailError",
    "TrainingDataError",
    "TrainingError",
]


class E5VError(Exception):
    """Base class of every error raised by e5v: catch it to handle them all."""


class InvalidInputError(E5VError, ValueError):
    """An input item cannot be embedded (an unsupported type, an empty text, an image that
    does not decode or is over ``max_image_pixels``); raised by every ``embed*`` method, the
    client and the server's parsing. The message names the item's index and the fix."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message if index is None else f"item {index}: {message}")
        self.index = index
        self.reason = message

    def shifted(self, offset: int) -> InvalidInputError:
        """The same error for an item ``offset`` places further on in a longer list."""
        return InvalidInputError(self.reason, index=None if self.index is None else self.index + offset)


class ConfigurationError(E5VError, ValueError):
    """An option has a value e5v cannot use (a device, a dtype, a size, a persisted collection
    config, a server that refuses the key); raised where the option is given, before any work.
    The message lists the valid values."""


class DatasetUnavailableError(ConfigurationError):
    """An evaluation benchmark's data is neither in the data folder nor reachable on the Hub;
    raised by :mod:`e5v.evaluation` before any model runs. The message names what to download
    and where to put it."""


class MissingDependencyError(E5VError, ImportError):
    """An optional feature's package is not installed; raised on first use of the feature.
    The message says which extra to install."""


class ModelLoadError(E5VError):
    """A checkpoint or processor cannot be loaded, or is not a LLaVA-NeXT model e5v can use;
    raised by :func:`e5v.model.loading.load` (and so by every embedder's constructor)."""


class EmbeddingError(E5VError, RuntimeError):
    """The model failed while embedding (out of memory at batch size 1, non-finite output),
    or a server answered with something that is not the vectors asked for."""


class StoreError(E5VError):
    """A collection cannot be used as asked (missing, not made by e5v, of another model, a bad
    name), or the database failed; raised by :class:`e5v.collection.repository.Store`."""


class ThumbnailError(E5VError):
    """A record has no thumbnail to give: not an image, its file gone, changed or unreadable;
    raised by :class:`e5v.server.thumbnails.Thumbnails` (answered as a 404)."""


class QueueFullError(E5VError):
    """The server's scheduler holds as many items as it may (``max_queued_items``); raised by
    ``Scheduler.submit`` (answered as a 429). Retry later."""


class RequestTooLargeError(E5VError):
    """One job asks for more than one request may: its images' pixels over
    ``max_request_pixels``; raised by the scheduler (answered as a 413). Split the request."""


class RequestError(E5VError):
    """A request the server refuses: an HTTP status, OpenAI's error type (``kind``), the
    parameter at fault and the message; raised while a request is parsed or checked, and
    answered in the API's error shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class TrainingError(E5VError):
    """Training cannot start or continue (a missing package, a checkpoint that does not match,
    4-bit loading off CUDA); raised by :mod:`e5v.training`."""


class TrainingDataError(TrainingError, ValueError):
    """A training or evaluation file cannot be used; the message names the file, row and column."""
