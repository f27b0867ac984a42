"""Training pairs from CSV, TSV, JSON Lines or Parquet files, and their batch order.

Columns are ``anchor``, ``positive`` and an optional ``negative`` (a hard negative);
SimCSE's NLI names ``sent0``, ``sent1``, ``hard_neg`` are accepted as well, and any
other names can be mapped with ``columns={"anchor": "question", ...}``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from e5v.core.prompts import IMAGE_TOKEN
from e5v.errors import TrainingDataError
from e5v.optional import require

__all__ = ["ROLE_NAMES", "PairData", "epoch_batches", "load_pairs"]

#: Accepted column names for each role, in order of preference.
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "anchor": ("anchor", "sent0"),
    "positive": ("positive", "sent1"),
    "negative": ("negative", "hard_neg"),
}
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class PairData:
    """Anchors, their positives and (optionally) one hard negative each, row-aligned."""

    anchors: list[str]
    positives: list[str]
    negatives: list[str] | None
    source: str

    def __len__(self) -> int:
        return len(self.anchors)

    def rows(self, indices: list[int]) -> tuple[list[str], list[str], list[str] | None]:
        """The anchors, positives and negatives of some rows."""
        negatives = None if self.negatives is None else [self.negatives[i] for i in indices]
        return [self.anchors[i] for i in indices], [self.positives[i] for i in indices], negatives


def load_pairs(path: str | Path, columns: Mapping[str, str] | None = None) -> PairData:
    """Read a pair file; the format comes from the suffix (.csv, .tsv, .jsonl/.json, .parquet)."""
    path = Path(path)
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise TrainingDataError(f"{path}: unknown data format {path.suffix!r}; use one of {sorted(_FORMATS)}")
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such file")
    names, records = _read(path, kind)
    roles = _resolve_columns(path, names, columns or {})
    data: dict[str, list[str]] = {role: [] for role in roles}
    for row, record in enumerate(records, start=1):
        for role, column in roles.items():
            data[role].append(_cell(path, row, column, record.get(column)))
    if not data["anchor"]:
        raise TrainingDataError(f"{path}: no rows; the file needs a header and at least one pair")
    return PairData(data["anchor"], data["positive"], data.get("negative"), str(path))


def _read(path: Path, kind: str) -> tuple[list[str], Iterator[Mapping[str, Any]]]:
    """Column names and an iterator of records."""
    if kind in ("csv", "tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="," if kind == "csv" else "\t")
            records = list(reader)
            return list(reader.fieldnames or []), iter(records)
    if kind == "jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainingDataError(f"{path}: line {line_number} is not valid JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise TrainingDataError(f"{path}: line {line_number} is not a JSON object")
                records.append(record)
        names = list(dict.fromkeys(key for record in records for key in record))
        return names, iter(records)
    pq = require("pyarrow.parquet", "train")
    table = pq.read_table(path)
    return list(table.column_names), iter(table.to_pylist())


def _resolve_columns(path: Path, names: list[str], columns: Mapping[str, str]) -> dict[str, str]:
    """Role -> column name; ``negative`` only if the data has one."""
    roles: dict[str, str] = {}
    for role, accepted in ROLE_NAMES.items():
        wanted = (columns[role],) if role in columns else accepted
        found = next((name for name in wanted if name in names), None)
        if found is not None:
            roles[role] = found
        elif role != "negative" or role in columns:
            raise TrainingDataError(
                f"{path}: no {role} column (looked for {' or '.join(map(repr, wanted))}; the file has "
                f"{names or 'no columns'}). Rename the column or map it with `columns` ({role}=NAME)"
            )
    return roles


def _cell(path: Path, row: int, column: str, value: object) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise TrainingDataError(f"{path}: row {row} has no text in column {column!r}; drop or fill the row")
    if not isinstance(value, str):
        raise TrainingDataError(f"{path}: row {row}, column {column!r} holds {type(value).__name__}, not text")
    if IMAGE_TOKEN in value:
        raise TrainingDataError(
            f"{path}: row {row}, column {column!r} contains the reserved {IMAGE_TOKEN!r} placeholder; remove it"
        )
    return value


def epoch_batches(
    rows: int, batch_size: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This process's row indices for each forward pass of one epoch.

    The rows are shuffled by ``seed`` and ``epoch`` alone (so a resumed run sees the
    same order), cut into global batches of ``batch_size * world_size`` (an incomplete
    last one is dropped), and each process takes its slice of each.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(rows, generator=generator).tolist()
    width = batch_size * world_size
    return [
        order[start + rank * batch_size : start + (rank + 1) * batch_size]
        for start in range(0, rows - width + 1, width)
    ]
