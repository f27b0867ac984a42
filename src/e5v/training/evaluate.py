"""Retrieval of held-out positives: where each anchor's positive ranks among all candidates."""

from __future__ import annotations

import numpy as np

__all__ = ["rank_positives"]


def rank_positives(anchors: np.ndarray, positives: np.ndarray, negatives: np.ndarray | None = None) -> dict[str, float]:
    """Mean rank (1 = best) and top-1 accuracy of each anchor's positive among every
    positive and negative. Inputs are unit rows, row ``i`` of each belonging together."""
    candidates = positives if negatives is None else np.concatenate([positives, negatives])
    scores = anchors @ candidates.T
    target = scores[np.arange(len(anchors)), np.arange(len(anchors))]
    ranks = 1 + (scores > target[:, None]).sum(axis=1)
    return {"mean_rank": float(ranks.mean()), "accuracy": float((ranks == 1).mean()), "candidates": len(candidates)}
