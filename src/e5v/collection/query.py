"""Searching a collection: filters on its records, and results grouped by PDF page or file.

Filters (:func:`parse_where`) are ``KEY=VALUE`` (equal), ``KEY!=VALUE`` (not equal),
``KEY=A..B`` (a number from A to B, either end left open: ``page=3..``), ``path~TEXT``
(the path holds TEXT), ``path^=PREFIX`` (the path starts with PREFIX) and ``text~WORDS``
(the record's text holds WORDS). They become Chroma's ``where`` (the ``path`` tests a
list of the paths that pass them, read from the collection) and, for ``text~``, its
``where_document``; every filter must hold.

Grouping (:func:`search`, ``group``): ``none`` ranks records one by one, as the paper's
protocol does. ``page`` gives one hit per PDF page (and per other file), ``file`` one per
file: the best candidates of each kind (image, text, interleaved) are ranked by cosine
similarity, each group takes in each kind the rank of its best record there, and groups
are ranked by reciprocal-rank fusion, ``sum over kinds of 1 / (rrf_k + rank)`` (Cormack et
al., 2009; ``rrf_k`` 60), its per-kind matches (record id, cosine score, rank) kept in the
hit. A file that cannot hold a kind (a photo has no text, a note no picture) counts for that
kind the mean of its own terms, so a photo first among the images is not put below a page
only because the page has text as well. :func:`default_group` is ``page`` for a collection
that holds PDF pages, else ``none``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from e5v.collection.records import BOOKKEEPING, RECORD_KINDS
from e5v.collection.repository import Hit, Store, StoredRecord
from e5v.errors import ConfigurationError, E5VError, StoreError

__all__ = [
    "CANDIDATES",
    "GROUPS",
    "RRF_K",
    "Condition",
    "Group",
    "KindMatch",
    "Result",
    "ResultHit",
    "default_group",
    "parse_where",
    "search",
    "where_from",
]

Group = Literal["page", "file", "none"]
#: The ways results can be grouped.
GROUPS: tuple[Group, ...] = ("page", "file", "none")
#: Reciprocal-rank fusion's constant: a group ranked r in a kind scores 1 / (RRF_K + r) there.
RRF_K = 60
#: Candidates each kind contributes to grouped results, at least (or 4 x k if more).
CANDIDATES = 100
#: Metadata fields whose values are whole numbers.
NUMERIC = frozenset({"page", "passage", "start", "end"})
_EXPRESSION = re.compile(r"\s*([A-Za-z_][\w.-]*)\s*(!=|\^=|~|=)(.*)", re.DOTALL)
_RANGE = re.compile(r"\s*(-?\d+)?\s*\.\.\s*(-?\d+)?\s*")
Scalar = str | int | float | bool


@dataclass(frozen=True)
class Condition:
    """One filter: ``key``, ``op`` (``=``, ``!=``, ``..``, ``~`` or ``^=``) and ``value``
    (a ``(low, high)`` pair for a range, either end ``None``)."""

    key: str
    op: str
    value: Any

    def matches_path(self, path: str) -> bool:
        """Whether ``path`` passes this ``path~`` or ``path^=`` filter."""
        return self.value in path if self.op == "~" else path.startswith(self.value)


def parse_where(expressions: Iterable[str], *, base: Path | None = None) -> list[Condition]:
    """The filters of ``expressions`` (see the module); a relative ``path`` or ``path^=``
    value is taken from ``base`` when given. Raises :class:`ConfigurationError` naming
    the ``where`` entry that cannot be read."""
    conditions = []
    for expression in expressions:
        matched = _EXPRESSION.fullmatch(expression)
        if matched is None:
            raise ConfigurationError(
                f"`where` {expression!r} is not a filter: write KEY=VALUE, KEY!=VALUE, KEY=LOW..HIGH, "
                "path~TEXT, path^=PREFIX or text~WORDS"
            )
        key, op, raw = matched.group(1), matched.group(2), matched.group(3).strip()
        conditions.append(_condition(key, op, raw, base))
    return conditions


def where_from(value: Sequence[str] | Mapping[str, Scalar] | None, *, base: Path | None = None) -> list[Condition]:
    """Filters from a list of expressions (:func:`parse_where`) or a mapping of keys to the
    values they must equal."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        conditions = []
        for key, wanted in value.items():
            _check_key(key, str(key))
            if key in NUMERIC and (isinstance(wanted, bool) or not isinstance(wanted, int)):
                raise ConfigurationError(f"`where` {key!r} must be a whole number, got {wanted!r}")
            if key == "path" and isinstance(wanted, str):
                wanted = _absolute(wanted, base)
            conditions.append(Condition(key, "=", wanted))
        return conditions
    return parse_where(value, base=base)


def _check_key(key: str, expression: str) -> None:
    if key in BOOKKEEPING:
        raise ConfigurationError(f"`where` {expression!r}: {key!r} is the index's own field; filter on another key")


def _absolute(path: str, base: Path | None) -> str:
    return str((base / Path(path).expanduser()).absolute()) if base is not None else path


def _condition(key: str, op: str, raw: str, base: Path | None) -> Condition:
    expression = f"{key}{op}{raw}"
    _check_key(key, expression)
    if not raw:
        raise ConfigurationError(f"`where` {expression!r} has no value after {op!r}")
    if op in ("~", "^="):
        if op == "~" and key == "text":
            return Condition(key, op, raw)
        if key != "path":
            raise ConfigurationError(
                f"`where` {expression!r}: {op!r} works on path (and ~ on text) only; use {key}=VALUE"
            )
        if op == "^=":
            raw = _absolute(raw, base) + ("/" if raw.endswith(("/", "\\")) else "")
        return Condition(key, op, raw)
    ranged = _RANGE.fullmatch(raw) if op == "=" else None
    if ranged is not None:
        low, high = (None if part is None else int(part) for part in ranged.groups())
        if low is None and high is None:
            raise ConfigurationError(f"`where` {expression!r}: give at least one end of the range, as in page=2..5")
        if low is not None and high is not None and low > high:
            raise ConfigurationError(f"`where` {expression!r}: the range runs from {low} down to {high}; swap them")
        return Condition(key, "..", (low, high))
    value: Scalar = raw
    if key in NUMERIC:
        if not re.fullmatch(r"-?\d+", raw):
            raise ConfigurationError(f"`where` {expression!r}: {key} is a whole number (or a range LOW..HIGH)")
        value = int(raw)
    elif key == "path":
        value = _absolute(raw, base)
    elif re.fullmatch(r"-?\d+", raw):
        value = int(raw)
    elif raw in ("true", "false"):
        value = raw == "true"
    return Condition(key, op, value)


def _chroma_where(
    store: Store, conditions: Sequence[Condition], kind: str | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, bool]:
    """Chroma's ``where`` and ``where_document`` for the filters, and whether anything can match."""
    clauses: list[dict[str, Any]] = [] if kind is None else [{"kind": kind}]
    documents: list[dict[str, Any]] = []
    path_tests = [condition for condition in conditions if condition.op in ("~", "^=") and condition.key == "path"]
    for condition in conditions:
        if condition.op == "=":
            clauses.append({condition.key: condition.value})
        elif condition.op == "!=":
            clauses.append({condition.key: {"$ne": condition.value}})
        elif condition.op == "..":
            low, high = condition.value
            if low is not None:
                clauses.append({condition.key: {"$gte": low}})
            if high is not None:
                clauses.append({condition.key: {"$lte": high}})
        elif condition.key == "text":
            documents.append({"$contains": condition.value})
    if path_tests:
        paths = sorted(path for path in store.paths() if all(test.matches_path(path) for test in path_tests))
        if not paths:
            return None, None, False
        clauses.append({"path": {"$in": paths}})
    where = None if not clauses else clauses[0] if len(clauses) == 1 else {"$and": clauses}
    document = None if not documents else documents[0] if len(documents) == 1 else {"$and": documents}
    return where, document, True


class KindMatch(BaseModel):
    """A group's best record of one kind: its id, cosine score and rank among that kind's groups."""

    model_config = ConfigDict(frozen=True)

    id: str
    score: float
    rank: int


class ResultHit(Hit):
    """A search result: a record's :class:`~e5v.collection.repository.Hit`, or a page's or
    file's fused hit, whose ``score`` is its reciprocal-rank fusion, ``kinds`` its best
    record of each kind that matched, and ``pages`` its PDF's page count; its ``id``,
    ``kind`` and score-bearing fields are its best record's, its ``text`` and ``passage``
    its best passage's."""

    kinds: dict[str, KindMatch] | None = None
    pages: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """:meth:`Hit.to_dict`, with a fused hit's ``kinds`` and ``pages`` (and passage, text)."""
        shown = super().to_dict()
        if self.kinds is not None:
            for key in ("passage", "start", "end", "text"):
                if getattr(self, key) is not None:
                    shown[key] = getattr(self, key)
            if self.pages is not None:
                shown["pages"] = self.pages
            shown["kinds"] = {kind: match.model_dump() for kind, match in self.kinds.items()}
        return shown


@dataclass(frozen=True)
class Result:
    """One result before it becomes a hit: its shown ``record``, ``score``, and for a group
    its per-kind matches, best passage and page count."""

    record: StoredRecord
    score: float
    kinds: dict[str, KindMatch] | None = None
    passage: StoredRecord | None = None
    pages: int | None = None

    def hit(self, rank: int) -> ResultHit:
        """The hit this result is at ``rank``."""
        base = Hit.of(rank, self.record).model_dump()
        base["score"] = self.score
        if self.kinds is not None:
            shown = self.passage
            base.update(
                passage=None if shown is None else shown.metadata.get("passage"),
                start=None if shown is None else shown.metadata.get("start"),
                end=None if shown is None else shown.metadata.get("end"),
                text=None if shown is None else shown.document,
            )
        return ResultHit(**base, kinds=self.kinds, pages=self.pages)


def default_group(store: Store) -> Group:
    """``page`` when the collection holds a PDF's records, else ``none``."""
    collection = store.collection
    if collection is None:
        return "none"
    with _failing(store, "looking for PDF pages"):
        found = collection.get(where={"marker": {"$in": [True, False]}}, limit=1, include=[])
    return "page" if found["ids"] else "none"


def search(
    store: Store,
    vector: np.ndarray,
    *,
    k: int = 10,
    kind: str | None = None,
    where: Sequence[Condition] = (),
    group: Group = "none",
    exclude: Iterable[str] = (),
    candidates: int = CANDIDATES,
    rrf_k: int = RRF_K,
) -> list[Result]:
    """The ``k`` best results for ``vector`` among the records that pass ``kind`` and
    ``where`` (none of ``exclude``), best first: records one by one (``group="none"``),
    or fused per PDF page (``"page"``) or per file (``"file"``)."""
    if group not in GROUPS:
        raise ConfigurationError(f"`group` must be one of {', '.join(GROUPS)}, got {group!r}")
    left_out = set(exclude)
    chroma_where, document, possible = _chroma_where(store, where, kind)
    if not possible or k < 1 or store.collection is None:
        return []
    if group == "none":
        records = _nearest(store, vector, k + len(left_out), chroma_where, document)
        return [Result(record, float(record.score or 0.0)) for record in records if record.id not in left_out][:k]
    per_kind = max(candidates, 4 * k)
    kinds = [kind] if kind is not None else list(RECORD_KINDS)
    listed: dict[str, list[StoredRecord]] = {}
    for name in kinds:
        scoped = {"kind": name} if chroma_where is None else {"$and": [chroma_where, {"kind": name}]}
        found = _nearest(store, vector, per_kind + len(left_out), scoped, document)
        listed[name] = [record for record in found if record.id not in left_out][:per_kind]
    results = _fuse(listed, group, rrf_k)[:k]
    pages = _page_counts(store, {result.record.metadata.get("path") for result in results if result.record.page})
    return [
        Result(
            result.record,
            result.score,
            result.kinds,
            result.passage,
            pages.get(str(result.record.metadata.get("path"))) if result.record.page else None,
        )
        for result in results
    ]


def _fuse(listed: Mapping[str, Sequence[StoredRecord]], group: Group, rrf_k: int) -> list[Result]:
    """Groups ranked by reciprocal-rank fusion of their ranks in each kind's list."""
    matches: dict[tuple[str, int | None], dict[str, tuple[StoredRecord, int]]] = {}
    for name, records in listed.items():
        seen: set[tuple[str, int | None]] = set()
        for record in records:  # best first: a group's first record is its best of this kind
            key = (str(record.metadata.get("path")), record.page if group == "page" else None)
            if key not in seen:
                seen.add(key)
                matches.setdefault(key, {})[name] = (record, len(seen))
    queried = [name for name, records in listed.items() if records]
    fused = []
    for found in matches.values():
        terms = [1.0 / (rrf_k + rank) for _, rank in found.values()]
        in_pdf = any(record.page is not None for record, _ in found.values())
        cannot = 0 if in_pdf else len(queried) - len(found)  # kinds a photo or a note cannot hold
        score = sum(terms) + cannot * sum(terms) / len(terms)
        best = max((record for record, _ in found.values()), key=lambda record: record.score or 0.0)
        passage = next((found[name][0] for name in ("text", "interleaved") if name in found), None)
        kinds = {
            name: KindMatch(id=record.id, score=float(record.score or 0.0), rank=rank)
            for name, (record, rank) in found.items()
        }
        fused.append(Result(best, round(score, 6), kinds, passage))
    fused.sort(key=lambda result: (-result.score, -(result.record.score or 0.0)))
    return fused


def _nearest(
    store: Store, vector: np.ndarray, n: int, where: dict[str, Any] | None, contains: dict[str, Any] | None
) -> list[StoredRecord]:
    collection = store.collection
    assert collection is not None  # checked by search()
    with _failing(store, "searching"):
        count = collection.count()
        if count == 0:
            return []
        found = collection.query(
            query_embeddings=vector.reshape(1, -1),
            n_results=min(n, count),
            where=where,
            where_document=contains,
            include=["metadatas", "documents", "distances"],
        )
    space = (collection.configuration_json.get("hnsw") or {}).get("space", "cosine")
    rows = zip(found["ids"][0], found["distances"][0], found["metadatas"][0], found["documents"][0])
    return [
        StoredRecord.of(id_, metadata, text, score=round(1.0 - distance / 2 if space == "l2" else 1.0 - distance, 6))
        for id_, distance, metadata, text in rows
    ]


def _page_counts(store: Store, paths: Iterable[Any]) -> dict[str, int]:
    """The number of pages stored of each PDF in ``paths``."""
    wanted = sorted(str(path) for path in paths if path)
    if not wanted or store.collection is None:
        return {}
    with _failing(store, "counting PDF pages"):
        got = store.collection.get(where={"path": {"$in": wanted}}, include=["metadatas"])
    counts: dict[str, int] = {}
    for metadata in got["metadatas"] or []:
        page = (metadata or {}).get("page")
        if isinstance(page, int):
            path = str(metadata.get("path"))
            counts[path] = max(counts.get(path, 0), page)
    return counts


@contextmanager
def _failing(store: Store, doing: str) -> Iterator[None]:
    """Chroma's errors as :class:`StoreError` naming what was being done."""
    try:
        yield
    except E5VError:
        raise
    except Exception as exc:  # chromadb raises plain exceptions
        where = store.url or str(store.db)
        raise StoreError(f"the Chroma database {where!r} failed while {doing}: {type(exc).__name__}: {exc}") from exc
