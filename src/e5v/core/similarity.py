"""Similarity and contrastive ranking over E5-V vectors (the model card's demos)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from e5v.core.embedder import E5VEmbedder

__all__ = ["ContrastiveRanking", "contrastive_rank", "cosine_similarity"]


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities between the rows of ``a`` and ``b`` (any norms): shape ``(len(a), len(b))``."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float32))
    b = np.atleast_2d(np.asarray(b, dtype=np.float32))
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


@dataclass(frozen=True)
class ContrastiveRanking:
    """``scores[i] = sim(positive, candidates[i]) - sim(negative, candidates[i])``."""

    scores: np.ndarray
    best: int

    @property
    def best_score(self) -> float:
        return float(self.scores[self.best])

    def order(self) -> np.ndarray:
        """Candidate indices, best first."""
        return np.argsort(-self.scores, kind="stable")


def contrastive_rank(
    embedder: E5VEmbedder, positive: Any, negative: Any, candidates: Sequence[Any]
) -> ContrastiveRanking:
    """Rank candidates by how much more they match ``positive`` than ``negative``.

    Queries and candidates are any inputs :meth:`E5VEmbedder.embed` takes (a ``str``
    is text; pass images as ``pathlib.Path``, PIL, bytes or arrays), e.g. which image
    is "a pet" rather than "an object".
    """
    if not candidates:
        raise ValueError("contrastive_rank needs at least one candidate")
    vectors = embedder.embed([positive, negative, *candidates])
    scores = vectors[2:] @ vectors[0] - vectors[2:] @ vectors[1]
    return ContrastiveRanking(scores=scores, best=int(np.argmax(scores)))
