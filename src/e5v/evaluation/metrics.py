"""Retrieval and correlation metrics in pure numpy, defined as the official evaluation and BEIR define them.

Ranks are 0-based. Ties are broken by position: of two items with equal scores the
earlier one ranks first (``np.argsort(-scores, kind="stable")``), so every metric is
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "MASKED_SCORE",
    "best_positive",
    "hit_rate",
    "judged_ranks",
    "mrr_at",
    "ndcg_at",
    "positive_ranks",
    "rank_of",
    "rankdata",
    "recall_at",
    "spearman",
    "top_k",
]

#: Score given to a query's own reference image before ranking (CIRR; the official value).
MASKED_SCORE = -1.0


def rank_of(scores: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Rank of ``scores[i, columns[i]]`` in each row ``i``: the items that score higher, plus
    those that score the same and come earlier."""
    scores = np.asarray(scores)
    columns = np.asarray(columns, dtype=np.int64)
    rows = np.arange(scores.shape[0])
    own = scores[rows, columns][:, None]
    earlier = np.arange(scores.shape[1])[None, :] < columns[:, None]
    return ((scores > own) | ((scores == own) & earlier)).sum(axis=1)


def best_positive(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Each row's first-ranked positive column (``positive`` is a boolean matrix with at least
    one ``True`` a row)."""
    if not positive.any(axis=1).all():
        raise ValueError("every query needs at least one positive item")
    best = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    return np.argmax(positive & (scores == best), axis=1)


def positive_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    positives: Sequence[Sequence[int]],
    *,
    masked: Sequence[int] | None = None,
    chunk_size: int = 1024,
) -> np.ndarray:
    """For each query, the rank of its first-ranked positive in the gallery, by cosine
    (``queries @ gallery.T``; rows are unit vectors). ``masked[i]``, if given, is a gallery
    column whose score is set to :data:`MASKED_SCORE` for query ``i`` before ranking (CIRR
    drops the query's reference image from its own ranking this way)."""
    if len(positives) != len(queries):
        raise ValueError(f"{len(positives)} positive sets for {len(queries)} queries")
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk_size):
        stop = min(start + chunk_size, len(queries))
        scores = queries[start:stop] @ gallery.T
        if masked is not None:
            scores[np.arange(stop - start), np.asarray(masked[start:stop], dtype=np.int64)] = MASKED_SCORE
        positive = np.zeros(scores.shape, dtype=bool)
        for row, columns in enumerate(positives[start:stop]):
            positive[row, list(columns)] = True
        ranks[start:stop] = rank_of(scores, best_positive(scores, positive))
    return ranks


def hit_rate(ranks: np.ndarray, k: int) -> float:
    """Share of queries with a positive in their top ``k`` (CLIP-style Recall@k: a hit when
    ANY correct item is there)."""
    return float(np.mean(np.asarray(ranks) < k)) if len(ranks) else float("nan")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best columns of each row, best first (ties: the earlier column first)."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def judged_ranks(scores: np.ndarray, relevant: Sequence[int]) -> np.ndarray:
    """Ranks of the ``relevant`` columns in one row of ``scores``."""
    scores = np.asarray(scores)
    columns = np.asarray(relevant, dtype=np.int64)
    if columns.size == 0:
        return columns
    return rank_of(np.broadcast_to(scores, (len(columns), len(scores))), columns)


def recall_at(ranks: np.ndarray, k: int) -> float:
    """BEIR's Recall@k for one query: the share of its relevant items ranked in the top ``k``."""
    return float(np.mean(np.asarray(ranks) < k)) if len(ranks) else float("nan")


def mrr_at(ranks: np.ndarray, k: int = 10) -> float:
    """Reciprocal rank of one query's first relevant item, 0 if it is not in the top ``k``."""
    first = int(np.min(ranks)) if len(ranks) else k
    return 1.0 / (first + 1) if first < k else 0.0


def ndcg_at(ranks: np.ndarray, gains: np.ndarray, k: int = 10) -> float:
    """nDCG@k of one query as trec_eval (and so BEIR and MTEB) computes it: gain = the
    relevance grade, discount ``log2(rank + 2)``; the ideal ranking orders the judged
    relevant items by grade."""
    ranks = np.asarray(ranks)
    gains = np.asarray(gains, dtype=np.float64)
    inside = ranks < k
    dcg = float(np.sum(gains[inside] / np.log2(ranks[inside] + 2)))
    ideal = np.sort(gains)[::-1][:k]
    idcg = float(np.sum(ideal / np.log2(np.arange(len(ideal)) + 2)))
    return dcg / idcg if idcg > 0 else 0.0


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (``scipy.stats.rankdata``'s default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, len(values)])
    average = first + (counts + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = average[group]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's of the average ranks (``scipy.stats.spearmanr``)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} values against {len(b)}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = float(np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))
    return float(np.sum(ra * rb) / denominator) if denominator > 0 else float("nan")
