"""The results table (e5v's figures beside the paper's and MTEB's) and the JSON report."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from e5v.evaluation.results import TaskResult

__all__ = ["format_table", "report_dict", "write_report"]

Results = Mapping[str, Mapping[str, TaskResult]]  # setting label -> task -> result


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}"


def format_table(
    results: Results,
    *,
    paper: Mapping[str, Mapping[str, float]] | None = None,
    mteb: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """One row a (task, metric): a column per setting (after the first, with its difference
    to the first), then the paper's and MTEB's figures where given. All in percent."""
    labels = list(results)
    tasks: list[str] = []
    for by_task in results.values():
        tasks.extend(task for task in by_task if task not in tasks)
    header = ["task", "metric", *(labels if len(labels) > 1 else ["e5v"])]
    if paper is not None:
        header.append("paper")
    if mteb is not None:
        header.append("MTEB")
    rows = [header]
    notes = []
    for task in tasks:
        names: list[str] = []
        for by_task in results.values():
            if task in by_task:
                names.extend(n for n in by_task[task].metrics if n not in names)
        names.extend(n for n in (paper or {}).get(task, {}) if n not in names)
        for name in names:
            values = [by_task[task].metrics.get(name) if task in by_task else None for by_task in results.values()]
            cells = [_cell(values[0])]
            for value in values[1:]:
                delta = "" if value is None or values[0] is None else f" ({value - values[0]:+.2f})"
                cells.append(_cell(value) + delta)
            row = [task, name, *cells]
            if paper is not None:
                row.append(_cell(paper.get(task, {}).get(name)))
            if mteb is not None:
                row.append(_cell(mteb.get(task, {}).get(name)))
            rows.append(row)
        for label, by_task in results.items():
            if task in by_task and "submission" in by_task[task].files:
                prefix = f"{label}: " if len(labels) > 1 else ""
                notes.append(
                    f"{task}: {prefix}submission written to {by_task[task].files['submission']}; the CIRR "
                    "evaluation server scores it (the paper's figures are the server's)"
                )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([line.rstrip() for line in lines] + notes)


def report_dict(
    results: Results,
    settings: Mapping[str, Mapping[str, Any]],
    *,
    paper: Mapping[str, Mapping[str, float]] | None = None,
    mteb: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """Everything a run found, with the versions and settings it ran with."""
    import torch
    import transformers

    from e5v import __version__

    tasks = {task for by_task in results.values() for task in by_task}
    out: dict[str, Any] = {
        "versions": {
            "e5v": __version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "settings": {label: dict(options) for label, options in settings.items()},
        "results": {label: {task: r.to_dict() for task, r in by_task.items()} for label, by_task in results.items()},
    }
    if paper is not None:
        out["paper"] = {task: dict(v) for task, v in paper.items() if task in tasks}
    if mteb is not None:
        out["mteb"] = {task: dict(v) for task, v in mteb.items() if task in tasks}
    return out


def write_report(path: str | Path, report: Mapping[str, Any]) -> None:
    """Write the report as indented JSON (NaN as null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    Path(path).write_text(json.dumps(clean(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
