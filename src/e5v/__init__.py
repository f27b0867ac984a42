"""e5v: E5-V universal multimodal embeddings (text, images, interleaved, composed) in one space."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from e5v.client import RemoteEmbedder
from e5v.core.inputs import Composed, Interleaved
from e5v.core.prompts import PromptSet
from e5v.core.protocol import Embedder
from e5v.core.similarity import ContrastiveRanking, contrastive_rank, cosine_similarity
from e5v.defaults import DEFAULT_MODEL
from e5v.errors import E5VError, EmbeddingError, InvalidInputError, ModelLoadError

if TYPE_CHECKING:
    from e5v.core.embedder import E5VEmbedder

try:
    __version__ = version("e5v")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DEFAULT_MODEL",
    "Composed",
    "ContrastiveRanking",
    "E5VEmbedder",
    "E5VError",
    "Embedder",
    "EmbeddingError",
    "Interleaved",
    "InvalidInputError",
    "ModelLoadError",
    "PromptSet",
    "RemoteEmbedder",
    "__version__",
    "contrastive_rank",
    "cosine_similarity",
]


def __getattr__(name: str) -> Any:
    """Import the embedder (and torch) on first use, so ``e5v --help`` stays fast."""
    if name == "E5VEmbedder":
        from e5v.core.embedder import E5VEmbedder

        return E5VEmbedder
    raise AttributeError(f"module 'e5v' has no attribute {name!r}")
