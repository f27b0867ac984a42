"""e5v: E5-V universal multimodal embeddings (text, images, interleaved, composed) in one space."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from e5v.embedder import DEFAULT_MODEL, E5VEmbedder
from e5v.errors import E5VError, EmbeddingError, InvalidInputError, ModelLoadError
from e5v.inputs import Composed, Interleaved
from e5v.prompts import PromptSet
from e5v.similarity import ContrastiveRanking, contrastive_rank, cosine_similarity

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
    "EmbeddingError",
    "Interleaved",
    "InvalidInputError",
    "ModelLoadError",
    "PromptSet",
    "__version__",
    "contrastive_rank",
    "cosine_similarity",
]
