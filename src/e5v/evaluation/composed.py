"""CIRR and FashionIQ composed image retrieval, as the official ``retrieval.py`` runs them.

CIRR: queries ``candidate`` (the reference image) with ``caption`` under the composed
prompt; the gallery under the CIRR gallery prompt; the query's own reference image
(``candidate_id``) scored -1 before ranking. Val: Recall@1/5/10/50 of ``target_id``; test:
the top 50 gallery ids per ``pairid`` in the official submission JSON.

FashionIQ (val, per category): the category's prompts (toptee's say "shirt"); each query
text is its two captions, each stripped of ``.?, `` at both ends, joined by ``", "``, in
both orders; the two prompts' final hidden states are summed, then normalised. No
reference masking. Recall@10/50 per category and their average over the three.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from e5v.core.prompts import COMPOSED_PROMPT, GALLERY_PROMPT, PromptSet, fashioniq_prompts
from e5v.errors import InvalidInputError
from e5v.evaluation.encoder import Column, Encoder
from e5v.evaluation.metrics import MASKED_SCORE, hit_rate, positive_ranks, top_k
from e5v.evaluation.results import TaskResult

__all__ = [
    "CIRR_DATASETS",
    "CIRR_KS",
    "CIRR_PROMPTS",
    "FASHIONIQ_CATEGORIES",
    "FASHIONIQ_DATASETS",
    "FASHIONIQ_KS",
    "FASHIONIQ_PROMPT_WORD",
    "cirr_submission",
    "fashioniq_prompt_set",
    "fashioniq_text",
    "run_cirr",
    "run_fashioniq",
]

#: (queries, gallery) as (Hub dataset, split), for val and test.
CIRR_DATASETS = {
    "val": (("royokong/cirr_val", "val"), ("royokong/cirr_imgs", "val")),
    "test": (("royokong/cirr_test", "test"), ("royokong/cirr_imgs", "test")),
}
CIRR_KS = (1, 5, 10, 50)
CIRR_PROMPTS = {"composed": COMPOSED_PROMPT, "image": GALLERY_PROMPT}
#: The CIRR test server's submission format.
CIRR_SUBMISSION_HEADER = {"version": "rc2", "metric": "recall"}
CIRR_SUBMISSION_TOP = 50

FASHIONIQ_DATASETS = (("royokong/fashioniq_val", "val"), ("royokong/fashioniq_val_imgs", "val"))
FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FASHIONIQ_KS = (10, 50)
#: The garment word in each category's prompts: the official evaluation says "shirt" for toptee.
FASHIONIQ_PROMPT_WORD = {"dress": "dress", "shirt": "shirt", "toptee": "shirt"}


def _ids(dataset: Any, column: str, what: str) -> list[str]:
    try:
        return [str(value) for value in dataset.select_columns([column])[column]]
    except (KeyError, ValueError) as exc:
        raise InvalidInputError(f"{what} has no column {column!r} ({exc})") from None


def _positions(ids: Sequence[str]) -> dict[str, int]:
    """Each id's first position (``list.index``, as the official code looks them up)."""
    first: dict[str, int] = {}
    for position, value in enumerate(ids):
        first.setdefault(value, position)
    return first


def _lookup(positions: dict[str, int], wanted: Sequence[str], column: str, what: str) -> list[int]:
    missing = [(row, value) for row, value in enumerate(wanted) if value not in positions]
    if missing:
        row, value = missing[0]
        raise InvalidInputError(
            f"{what}: row {row}'s {column} {value!r} is not in the gallery ({len(missing)} such rows); "
            "use the gallery split that belongs to these queries"
        )
    return [positions[value] for value in wanted]


def _cirr_vectors(encoder: Encoder, queries: Any, gallery: Any, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    ids = _ids(gallery, "id", f"{what} gallery")
    gallery_vectors = encoder.images(Column(gallery, "img"), CIRR_PROMPTS["image"], f"{what} gallery")
    captions = [str(c) for c in queries.select_columns(["caption"])["caption"]]
    candidates = Column(queries, "candidate")
    query_vectors = encoder.composed(candidates, captions, CIRR_PROMPTS["composed"], f"{what} queries")
    return query_vectors, gallery_vectors, ids


def run_cirr(encoder: Encoder, queries: Any, gallery: Any) -> TaskResult:
    """CIRR val: Recall@1/5/10/50, the reference image masked from its own ranking."""
    query_vectors, gallery_vectors, ids = _cirr_vectors(encoder, queries, gallery, "cirr")
    positions = _positions(ids)
    targets = _lookup(positions, _ids(queries, "target_id", "cirr queries"), "target_id", "cirr")
    masked = _lookup(positions, _ids(queries, "candidate_id", "cirr queries"), "candidate_id", "cirr")
    ranks = positive_ranks(query_vectors, gallery_vectors, [[t] for t in targets], masked=masked)
    metrics = {f"R@{k}": 100 * hit_rate(ranks, k) for k in CIRR_KS}
    return TaskResult("cirr", metrics, {"queries": len(ranks), "gallery": len(ids)})


def cirr_submission(encoder: Encoder, queries: Any, gallery: Any) -> dict[str, Any]:
    """CIRR test: ``{"version": "rc2", "metric": "recall", "<pairid>": [50 gallery ids], ...}``,
    the reference image masked, for the CIRR evaluation server."""
    query_vectors, gallery_vectors, ids = _cirr_vectors(encoder, queries, gallery, "cirr-test")
    masked = _lookup(_positions(ids), _ids(queries, "candidate_id", "cirr-test queries"), "candidate_id", "cirr-test")
    pairs = _ids(queries, "pairid", "cirr-test queries")
    submission: dict[str, Any] = dict(CIRR_SUBMISSION_HEADER)
    for start in range(0, len(pairs), 1024):
        scores = query_vectors[start : start + 1024] @ gallery_vectors.T
        scores[np.arange(len(scores)), masked[start : start + 1024]] = MASKED_SCORE
        for pair, best in zip(pairs[start : start + 1024], top_k(scores, CIRR_SUBMISSION_TOP)):
            submission[pair] = [ids[j] for j in best]
    return submission


def fashioniq_text(captions: Sequence[str]) -> str:
    """A FashionIQ query text: the captions stripped of ``.?, `` at both ends, joined by ``", "``."""
    return ", ".join(caption.strip(".?, ") for caption in captions)


def fashioniq_prompt_set(category: str) -> PromptSet:
    """The prompts the official evaluation uses for a category (toptee's say "shirt")."""
    return fashioniq_prompts(FASHIONIQ_PROMPT_WORD[category])


def _category(dataset: Any, category: str) -> Any:
    categories = dataset.select_columns(["category"])["category"]
    return dataset.select([i for i, value in enumerate(categories) if value == category])


def run_fashioniq(
    encoder: Encoder,
    queries: Any,
    gallery: Any,
    *,
    categories: Sequence[str] = FASHIONIQ_CATEGORIES,
    limit: int | None = None,
) -> TaskResult:
    """FashionIQ val: Recall@10/50 per category and averaged (``limit``: first queries of each)."""
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for category in categories:
        rows, images = _category(queries, category), _category(gallery, category)
        if limit is not None:
            rows = rows.select(range(min(limit, len(rows))))
        if len(rows) == 0 or len(images) == 0:
            raise InvalidInputError(f"fashioniq has no {category} queries or gallery images (column 'category')")
        prompts = fashioniq_prompt_set(category)
        ids = _ids(images, "id", f"fashioniq {category} gallery")
        gallery_vectors = encoder.images(Column(images, "img"), prompts.image, f"fashioniq {category} gallery")
        captions = [list(c) for c in rows.select_columns(["caption"])["caption"]]
        for row, pair in enumerate(captions):
            if len(pair) != 2 or not all(isinstance(c, str) for c in pair):
                raise InvalidInputError(f"fashioniq {category} row {row}: 'caption' must be a list of two captions")
        query_vectors = encoder.summed_composed(
            Column(rows, "candidate"),
            [fashioniq_text(pair) for pair in captions],
            [fashioniq_text(pair[::-1]) for pair in captions],
            prompts.composed,
            f"fashioniq {category} queries",
        )
        targets = _lookup(_positions(ids), _ids(rows, "target_id", f"fashioniq {category}"), "target_id", category)
        ranks = positive_ranks(query_vectors, gallery_vectors, [[t] for t in targets])
        for k in FASHIONIQ_KS:
            metrics[f"{category} R@{k}"] = 100 * hit_rate(ranks, k)
        counts[f"{category} queries"] = len(ranks)
        counts[f"{category} gallery"] = len(ids)
    for k in FASHIONIQ_KS:
        metrics[f"avg R@{k}"] = float(np.mean([metrics[f"{c} R@{k}"] for c in categories]))
    return TaskResult("fashioniq", metrics, counts)
