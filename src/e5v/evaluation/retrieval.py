"""Retrieval on your own data, in the layout BEIR and MTEB use.

- queries and corpus: JSON lines, one object each, with an ``id`` (or BEIR's ``_id``) and a
  ``text`` and/or an ``image`` (a path, relative to the JSONL file's folder unless
  absolute). BEIR's ``title`` is put before the text with a space, as BEIR's dense models
  do. A query with both a text and an image is a composed query (the image modified as the
  text says, the paper's prompt); a corpus item with both is ONE interleaved vector (the
  image, then the text).
- qrels: TSV lines ``query-id<TAB>corpus-id<TAB>score`` (a header line is skipped); a score
  above 0 marks a relevant item, and is its grade for nDCG.

Metrics, per kind of query (text, image, composed) and over all: Recall@k (the share of a
query's relevant items in its top k, BEIR's), MRR@10 and nDCG@10 (trec_eval's, linear
gains), averaged over the queries that have a relevant item, in percent.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from e5v.core.inputs import Composed, Interleaved
from e5v.errors import InvalidInputError
from e5v.evaluation.metrics import judged_ranks, mrr_at, ndcg_at, recall_at
from e5v.evaluation.results import TaskResult

if TYPE_CHECKING:
    from e5v.core.embedder import E5VEmbedder

__all__ = ["DEFAULT_KS", "Item", "evaluate_retrieval", "read_items", "read_qrels"]

logger = logging.getLogger(__name__)

DEFAULT_KS = (1, 5, 10)
CUTOFF = 10  # of MRR and nDCG
QUERY_KINDS = ("text", "image", "composed")


@dataclass(frozen=True)
class Item:
    """A query or corpus item: its id and its text and/or image file."""

    id: str
    text: str | None = None
    image: Path | None = None

    @property
    def kind(self) -> str:
        """``text``, ``image``, or ``composed`` (both)."""
        return "composed" if self.text is not None and self.image is not None else "text" if self.text else "image"

    def as_query(self) -> str | Path | Composed:
        if self.text is not None and self.image is not None:
            return Composed(self.image, self.text)
        return self.image if self.image is not None else str(self.text)

    def as_document(self) -> str | Path | Interleaved:
        if self.text is not None and self.image is not None:
            return Interleaved([self.image, self.text])
        return self.image if self.image is not None else str(self.text)


def read_items(path: str | Path) -> list[Item]:
    """Items of a JSONL file (module docstring), each checked; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not UTF-8 text; write the JSONL file as UTF-8") from None
    items: list[Item] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{where}: not JSON ({exc.msg}); write one JSON object a line") from None
        if not isinstance(record, dict):
            raise InvalidInputError(f"{where}: expected a JSON object with an id and a text and/or an image")
        item = _item(record, where, path.parent)
        if item.id in seen:
            raise InvalidInputError(f"{where}: id {item.id!r} already used on line {seen[item.id]}; ids must be unique")
        seen[item.id] = number
        items.append(item)
    if not items:
        raise InvalidInputError(f"{path} holds no items; write one JSON object a line")
    return items


def _item(record: Mapping[str, Any], where: str, folder: Path) -> Item:
    raw_id = record.get("id", record.get("_id"))
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id) == "":
        raise InvalidInputError(f"{where}: needs an 'id' (or '_id'): a string or a number")
    parts = []
    for field in ("title", "text"):
        value = record.get(field)
        if value is not None and not isinstance(value, str):
            raise InvalidInputError(f"{where}: {field!r} must be a string, got {type(value).__name__}")
        if value:
            parts.append(value)
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise InvalidInputError(f"{where}: 'image' must be a path (a string)")
    image_path = None
    if image:
        image_path = Path(image).expanduser()
        image_path = image_path if image_path.is_absolute() else folder / image_path
        if not image_path.is_file():
            raise InvalidInputError(f"{where}: image {image!r} not found (looked for {str(image_path)!r})")
    if not parts and image_path is None:
        raise InvalidInputError(f"{where}: needs a 'text' and/or an 'image'")
    return Item(str(raw_id), " ".join(parts) if parts else None, image_path)


def read_qrels(path: str | Path, queries: Sequence[Item], corpus: Sequence[Item]) -> dict[str, dict[str, int]]:
    """Relevance judgements ``{query id: {corpus id: score}}``; every id must be known."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    query_ids = {q.id for q in queries}
    corpus_ids = {c.id for c in corpus}
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.rstrip("\n").split("\t")
        where = f"{path}:{number}"
        if len(fields) != 3:
            raise InvalidInputError(f"{where}: expected query-id<TAB>corpus-id<TAB>score, got {len(fields)} fields")
        query, item, score = (field.strip() for field in fields)
        try:
            grade = int(score)
        except ValueError:
            if number == 1 and not qrels:
                continue  # the header
            raise InvalidInputError(f"{where}: score {score!r} is not a whole number") from None
        if query not in query_ids:
            raise InvalidInputError(f"{where}: query-id {query!r} is not in the queries file")
        if item not in corpus_ids:
            raise InvalidInputError(f"{where}: corpus-id {item!r} is not in the corpus file")
        qrels.setdefault(query, {})[item] = grade
    return qrels


def evaluate_retrieval(
    embedder: E5VEmbedder,
    queries: Sequence[Item],
    corpus: Sequence[Item],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    prompts: str | None = None,
    progress: bool = False,
) -> dict[str, TaskResult]:
    """Metrics by kind of query (``text``, ``image``, ``composed``: each kind present) and over
    ``all`` when there are several kinds. ``prompts``: a preset of :data:`e5v.core.prompts.PRESETS`
    (default: the embedder's)."""
    judged = [q for q in queries if any(score > 0 for score in qrels.get(q.id, {}).values())]
    if not judged:
        raise InvalidInputError("no query has a relevant corpus item (a qrels score above 0); check the qrels file")
    if len(judged) < len(queries):
        left_out = len(queries) - len(judged)
        logger.warning("%d of %d queries have no relevant item in the qrels and are left out", left_out, len(queries))
    query_vectors = embedder.embed([q.as_query() for q in judged], prompts=prompts, show_progress_bar=progress)
    corpus_vectors = embedder.embed([c.as_document() for c in corpus], prompts=prompts, show_progress_bar=progress)
    column = {item.id: i for i, item in enumerate(corpus)}
    per_query: list[dict[str, float]] = []
    for start in range(0, len(judged), 256):
        scores = query_vectors[start : start + 256] @ corpus_vectors.T
        for query, row in zip(judged[start : start + 256], scores):
            relevant = [(column[c], g) for c, g in qrels[query.id].items() if g > 0]
            ranks = judged_ranks(row, [c for c, _ in relevant])
            gains = np.array([g for _, g in relevant], dtype=np.float64)
            values = {f"R@{k}": recall_at(ranks, k) for k in ks}
            values[f"MRR@{CUTOFF}"] = mrr_at(ranks, CUTOFF)
            values[f"nDCG@{CUTOFF}"] = ndcg_at(ranks, gains, CUTOFF)
            per_query.append(values)
    kinds = [kind for kind in QUERY_KINDS if any(q.kind == kind for q in judged)]
    out: dict[str, TaskResult] = {}
    for kind in kinds + (["all"] if len(kinds) > 1 else []):
        rows = [v for q, v in zip(judged, per_query) if kind in ("all", q.kind)]
        metrics = {name: 100 * float(np.mean([r[name] for r in rows])) for name in rows[0]}
        out[f"{kind} queries"] = TaskResult(f"{kind} queries", metrics, {"queries": len(rows), "corpus": len(corpus)})
    return out
