"""Load a benchmark's data and run it: one entry point for every task of
:data:`e5v.evaluation.paper.TASKS`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from e5v.errors import ConfigurationError, DatasetUnavailableError
from e5v.evaluation.composed import (
    CIRR_DATASETS,
    CIRR_SUBMISSION_HEADER,
    FASHIONIQ_DATASETS,
    cirr_submission,
    run_cirr,
    run_fashioniq,
)
from e5v.evaluation.data import DataSource
from e5v.evaluation.encoder import Encoder
from e5v.evaluation.image_text import DATASETS as IMAGE_TEXT_DATASETS
from e5v.evaluation.image_text import run_image_text
from e5v.evaluation.paper import TASKS
from e5v.evaluation.render import load_font
from e5v.evaluation.results import TaskResult
from e5v.evaluation.sts import run_sts

__all__ = ["load_task_data", "load_tasks", "run_task"]

logger = logging.getLogger(__name__)

SENTEVAL = "SentEval's STS files"


def load_tasks(tasks: Sequence[str], source: DataSource, *, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """Each benchmark's data, all checked before any model is loaded: whatever is missing is
    named in ONE error (the first item's message says what to download and where to put it).
    ``limit`` keeps the first rows of each query set (images for Flickr30K/COCO, queries for
    CIRR and each FashionIQ category, pairs of each subset for STS): a smoke test, not the
    paper's numbers."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ConfigurationError(f"unknown task {unknown[0]!r}; choose one of {TASKS}")
    missing: dict[str, DatasetUnavailableError] = {}  # by dataset name (or SENTEVAL), the first error of each

    def get(name: str, split: str) -> Any:
        try:
            return source.dataset(name, split)
        except DatasetUnavailableError as exc:
            missing.setdefault(name, exc)
            return None

    data: dict[str, dict[str, Any]] = {}
    for task in tasks:
        if task in IMAGE_TEXT_DATASETS:
            data[task] = {"dataset": _first(get(*IMAGE_TEXT_DATASETS[task]), limit)}
        elif task in ("cirr", "cirr-test"):
            queries, gallery = CIRR_DATASETS["val" if task == "cirr" else "test"]
            data[task] = {"queries": _first(get(*queries), limit), "gallery": get(*gallery)}
        elif task == "fashioniq":
            queries, gallery = FASHIONIQ_DATASETS
            data[task] = {"queries": get(*queries), "gallery": get(*gallery), "limit": limit}
        else:
            try:
                data[task] = {"root": source.senteval(), "limit": limit}
            except DatasetUnavailableError as exc:
                missing.setdefault(SENTEVAL, exc)
    if missing:
        first, *others = missing.values()
        if not others:
            raise first
        later = list(missing)[1:]
        names = [name for name in later if name != SENTEVAL]
        root = source.data_dir or "DATA_DIR"
        also = [f"{', '.join(names)} (`hf download` each into {root}/NAME the same way)"] if names else []
        if SENTEVAL in later:
            also.append(f"{SENTEVAL} (`e5v eval sts` says how to get them)")
        raise DatasetUnavailableError(f"{first}. Also not available: {'; '.join(also)}")
    return data


def load_task_data(task: str, source: DataSource, *, limit: int | None = None) -> dict[str, Any]:
    """One benchmark's data (:func:`load_tasks`)."""
    return load_tasks([task], source, limit=limit)[task]


def run_task(
    task: str,
    encoder: Encoder,
    data: dict[str, Any],
    *,
    font: Any = None,
    submission: str | Path = "cirr-test-submission.json",
) -> TaskResult:
    """Run one benchmark of :data:`~e5v.evaluation.paper.TASKS` on its :func:`load_task_data`.
    I2I-Flickr30K draws with ``font`` (:func:`~e5v.evaluation.render.load_font`; ``None``:
    Pillow's); ``cirr-test`` writes the submission JSON to ``submission``."""
    if task in IMAGE_TEXT_DATASETS:
        if task == "i2i-flickr30k" and font is None:
            font = load_font(None)
        return run_image_text(encoder, data["dataset"], task, font=font)
    if task == "cirr":
        return run_cirr(encoder, data["queries"], data["gallery"])
    if task == "cirr-test":
        result = cirr_submission(encoder, data["queries"], data["gallery"])
        path = Path(submission)
        path.write_text(json.dumps(result) + "\n", encoding="utf-8")
        queries = len(result) - len(CIRR_SUBMISSION_HEADER)
        logger.info("wrote the CIRR test submission (%d queries) to %s", queries, path)
        return TaskResult(task, {}, {"queries": queries}, {"submission": str(path)})
    if task == "fashioniq":
        return run_fashioniq(encoder, data["queries"], data["gallery"], limit=data["limit"])
    if task == "sts":
        return run_sts(encoder, data["root"], limit=data["limit"])
    raise ConfigurationError(f"unknown task {task!r}; choose one of {TASKS}")


def _first(dataset: Any, limit: int | None) -> Any:
    return dataset if limit is None or dataset is None else dataset.select(range(min(limit, len(dataset))))
